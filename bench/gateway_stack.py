"""What bench/gateway_overhead.py measures against: the fake provider, our gateway and LiteLLM.

`GatewayStack` is the shared `stack.Stack` with no Celery worker and one `[[upstreams]]`
entry, plus `bench/fake_upstream.py` (the provider) and LiteLLM's proxy as further
children, so that one `stop` ends them all and the CPU accounting covers every process
the benchmark started. LiteLLM (`litellm[proxy]`, pinned) lives in its own venv
`bench/.venv-litellm`, installed on first use, and runs with a bare environment.
`Target` says how to call each of them, as a `loadgen.Load`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cpu import child_pids
from fake_upstream import ANSWER_TEXT
from loadgen import CallError, Load, Reply
from report import ROOT, say
from stack import Stack, deployment_toml, free_port, server_toml, spawn_bare, wait_for_http

# isort: split
# After `stack`, which puts the project root on sys.path.
from djangollmapi import processes
from djangollmapi.config import DEFAULT_WEB_THREADS, DEFAULT_WEB_WORKERS

UPSTREAM_MODEL = "fake-model"  # the provider's name for the model
MODEL = "fake-gpt"  # what clients of both gateways ask for
UPSTREAM_SECRET = "sk-fake-upstream-bench"  # the provider's key, held by both gateways
UPSTREAM_SECRET_ENV = "BENCH_UPSTREAM_KEY"
LITELLM_MASTER_KEY = "sk-litellm-bench"
LITELLM_VERSION = "1.106.2"
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LITELLM_INSTALL = (
    "python -m venv bench/.venv-litellm",
    f"bench/.venv-litellm/bin/pip install 'litellm[proxy]=={LITELLM_VERSION}'",
)
PROMPT = "Say hello in five words."
CHAT_PATH = "/v1/chat/completions"
FLOOR_PATH = "/v1/bench-floor"  # no such route: gunicorn + Django + our middleware + the JSON 404, nothing else
MAX_TOKENS = 16
WEB_WORKERS = DEFAULT_WEB_WORKERS  # what `serve` starts by default
WEB_THREADS = DEFAULT_WEB_THREADS
OURS_GROUPS = ("web (gunicorn workers)", "redis", "postgres backends")


@dataclass(frozen=True)
class Target:
    """Where the load generator sends the chat completion: a port, a bearer, a model name."""

    name: str  # direct | ours | floor | litellm
    label: str
    port: int
    bearer: str
    model: str
    groups: tuple[str, ...]  # the CPU groups (see GatewayStack.cpu_groups) that are this hop's own processes
    method: str = "POST"
    path: str = CHAT_PATH
    expect_status: int = 200
    streams: bool = True  # whether the streaming case applies

    def body(self, stream: bool) -> bytes:
        payload = {"model": self.model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}
        if stream:
            payload["stream"] = True
        return json.dumps(payload).encode()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.bearer}", "Content-Type": "application/json"}

    def load(self, stream: bool) -> Load:
        """Every call the same; a 200 must carry the fake provider's answer (streamed or not)."""
        body = self.body(stream) if self.method == "POST" else None
        check = check_answer if self.expect_status == 200 else None
        return Load(self.path, self.headers(), body, self.method, self.expect_status, stream, check)


def check_answer(_index: int, reply: Reply) -> None:
    if reply.streamed is not None:
        if reply.streamed.text != ANSWER_TEXT or reply.streamed.first_s is None:
            raise CallError("wrong text", repr(reply.streamed.text)[:300])
        return
    try:
        text = json.loads(reply.body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise CallError("wrong body", reply.body[:300].decode("utf-8", "replace")) from None
    if text != ANSWER_TEXT:
        raise CallError("wrong text", repr(text)[:300])


class GatewayStack(Stack):
    """Our stack with no worker and one upstream, plus the fake provider and LiteLLM as
    further children, so that one `stop` ends them all and the CPU accounting (and the
    share of the machine taken by *other* processes) covers every process we started."""

    def __init__(self, database: str, tmp: Path, skip_litellm: bool = False) -> None:
        self.upstream_port = free_port()
        self.litellm_port = free_port()
        super().__init__(database, tmp, self.write_config, [], WEB_WORKERS, WEB_THREADS)
        self.env[UPSTREAM_SECRET_ENV] = UPSTREAM_SECRET
        self.skip_litellm = skip_litellm
        self.litellm_version = ""
        self.litellm_error = ""

    def start(self) -> None:
        """The fake provider first (our config points at it), our stack, then LiteLLM."""
        self.start_upstream()
        super().start()
        if self.skip_litellm:
            self.litellm_error = "skipped (--skip-litellm)"
        else:
            self.start_litellm()

    def write_config(self, tmp: Path, port: int) -> str:
        """One cheap local deployment (the config needs one; no worker serves it) and the upstream."""
        head = server_toml("gateway_overhead.py", tmp, port, default_model="echo")
        return f"""{head}{deployment_toml("echo", "algorithms.echo:Echo", "cpu")}
[[upstreams]]
name = "fake"
base_url = "http://127.0.0.1:{self.upstream_port}/v1"
api_key_env = "{UPSTREAM_SECRET_ENV}"
models = {{ "{MODEL}" = "{UPSTREAM_MODEL}" }}
"""

    def start_upstream(self) -> None:
        say(f"starting the fake provider on 127.0.0.1:{self.upstream_port}")
        self.logs.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", str(self.upstream_port)]
        argv += ["--api-key", UPSTREAM_SECRET, "--model", UPSTREAM_MODEL]
        self.children.append(("fake upstream", processes.spawn(argv, log_path=self.logs / "upstream.log")))
        wait_for_http(self, self.upstream_port, "/v1/models", {"Authorization": f"Bearer {UPSTREAM_SECRET}"})

    def start_litellm(self) -> None:
        """LiteLLM's proxy with its defaults (1 worker, access log on), or the reason it is absent."""
        try:
            binary = ensure_litellm()
            self.litellm_version = litellm_version()
            config = self.tmp / "litellm.yaml"
            config.write_text(litellm_config_yaml(self.upstream_port))
            say(f"starting LiteLLM {self.litellm_version} proxy on 127.0.0.1:{self.litellm_port}")
            argv = [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(self.litellm_port)]
            self.children.append(("litellm", spawn_bare(argv, self.tmp, litellm_env(), self.logs / "litellm.log")))
            wait_for_http(self, self.litellm_port, "/health/liveliness", {})
        except Exception as exc:  # LiteLLM is the comparison, not the subject: go on without it
            self.litellm_error = f"{type(exc).__name__}: {exc}"
            say(f"LiteLLM unavailable, measuring without it: {self.litellm_error}")
            self.stop_child("litellm")

    def cpu_groups(self) -> dict[str, list[int]]:
        groups = super().cpu_groups()
        for name in ("fake upstream", "litellm"):
            pid = self.pid(name)
            if pid:
                groups[name] = [pid, *child_pids(pid)]
        return groups

    def targets(self) -> list[Target]:
        found = [
            Target("direct", "direct to the fake provider", self.upstream_port, UPSTREAM_SECRET, UPSTREAM_MODEL, ()),
            Target("ours", f"our gateway ({self.database})", self.port, self.api_key, MODEL, OURS_GROUPS),
            Target(
                "floor",
                "our web stack's floor (GET -> JSON 404)",
                self.port,
                self.api_key,
                MODEL,
                OURS_GROUPS,
                method="GET",
                path=FLOOR_PATH,
                expect_status=404,
                streams=False,
            ),
        ]
        if not self.litellm_error:
            found.append(Target("litellm", "LiteLLM proxy", self.litellm_port, LITELLM_MASTER_KEY, MODEL, ("litellm",)))
        return found

    def target(self, name: str) -> Target:
        return next(t for t in self.targets() if t.name == name)


# ---------------------------------------------------------------- LiteLLM


def ensure_litellm() -> Path:
    """The proxy's entry point in its own venv; installed (pinned) on first use, never
    into the app's venv: it brings its own FastAPI, pydantic, openai, httpx..."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if binary.exists():
        return binary
    say(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV.relative_to(ROOT)} (once, ~1 min)")
    python = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(python), "-m", "venv", str(LITELLM_VENV)], check=True, timeout=300)
    pip = [str(LITELLM_VENV / "bin" / "pip"), "install", "--quiet", f"litellm[proxy]=={LITELLM_VERSION}"]
    subprocess.run(pip, check=True, timeout=1200)
    return binary


def litellm_version() -> str:
    probe = "import importlib.metadata as m; print(m.version('litellm'))"
    python = str(LITELLM_VENV / "bin" / "python")
    return subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60).stdout.strip()


def litellm_config_yaml(upstream_port: int) -> str:
    """One model on the fake provider; a master key (checked per request, like our key);
    no database, no callbacks."""
    return f"""# written by bench/gateway_overhead.py
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{UPSTREAM_MODEL}
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: {UPSTREAM_SECRET}
general_settings:
  master_key: {LITELLM_MASTER_KEY}
"""


def litellm_env() -> dict[str, str]:
    """LiteLLM reads DATABASE_URL, REDIS_* and provider keys from its environment: start
    it with a bare one, so this benchmark's settings cannot turn its database or cache on.
    The model price map is the copy in the wheel (nothing fetched at start-up)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    return env
