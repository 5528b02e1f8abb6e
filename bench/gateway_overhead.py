"""Gateway overhead: the same chat completion sent straight to a provider, through our
upstream gateway, and through LiteLLM's proxy (issue #5).

Starts, in a temporary data dir:

  - `bench/fake_upstream.py`, a minimal OpenAI-compatible provider (stdlib HTTP server,
    fixed answer with usage, SSE when streaming) in its own process;
  - our stack: embedded Redis (or REDIS_URL), SQLite in WAL or PostgreSQL, `migrate`, a
    fresh key from `createapikey`, gunicorn gthread with the config's default shape
    (`web_workers` x `web_threads`, 2 x 32) and one `[[upstreams]]` entry pointing at the
    fake provider; no Celery worker (the web process forwards upstream calls itself);
  - LiteLLM's proxy (`litellm[proxy]`, pinned, in its own venv `bench/.venv-litellm`,
    installed on first use) with its default single uvicorn worker, no database, a
    master key, and the same fake provider as `openai/<model>`.

Then measures in ONE run, with one load generator for all three targets (a thread and a
keep-alive `http.client` connection per client, the same body and checks):

  (a) direct to the fake provider, (b) our gateway, (c) LiteLLM; each at 1 and 32
  concurrent clients, non-streaming, after a warm-up; then one client streaming
  (time to first content chunk). Also our web stack's floor: `GET /v1/bench-floor`, an
  unrouted path (gunicorn + Django + our middleware + the JSON 404, no gateway work).

Then our gateway's stages, timed in-process by `bench/gateway_stages.py` (key check and
Job INSERT, httpx, finish UPDATEs, logging, the rest of Django), to say where the added
latency goes.

Reports p50/p90/p99 latency, req/s, the latency each gateway adds to the direct call,
CPU ms per request per process (from /proc) and our throughput over LiteLLM's at 32
clients, against the issue's aims. Prints a table, writes
`bench/results/gateway_overhead.json` (`gateway_overhead-postgres.json` with
`--database postgres`). With `--profile`, afterwards records py-spy on our gunicorn
workers under the 32-client load and prints where their time goes. Every process it
starts is stopped on exit, error or Ctrl-C.

    .venv/bin/python bench/gateway_overhead.py [--requests 2000] [--database sqlite|postgres] [--profile]
        [--skip-litellm] [--stream-requests 500] [--stage-requests 500] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    RESULTS_DIR,
    ROOT,
    CpuMeter,
    Stack,
    child_pids,
    deployment_toml,
    free_port,
    install_signal_handlers,
    machine_info,
    no_nan,
    percentile,
    print_table,
    redact,
    run_in_threads,
    run_on_stack,
    say,
    server_toml,
    wait_for_quiet,
)
from fake_upstream import ANSWER_TEXT

# isort: split
# After `common`, which puts the project root on sys.path.
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
CONCURRENCIES = (1, 32)
REQUEST_TIMEOUT_S = 30
READY_TIMEOUT_S = 120
AIM_ADDED_P50_MS_1_CLIENT = 2.0
AIM_RATIO_VS_LITELLM_32_CLIENTS = 6.0
PROFILE_KEEP_MAX_BYTES = 1_000_000


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """Where a load generator sends the chat completion: a port, a bearer, a model name."""

    name: str  # direct | ours | litellm
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


# ---------------------------------------------------------------- stack


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
            self.children.append(("litellm", spawn_clean(argv, self.tmp, self.logs / "litellm.log")))
            wait_for_http(self, self.litellm_port, "/health/liveliness", {})
        except Exception as exc:  # LiteLLM is the comparison, not the subject: go on without it
            self.litellm_error = f"{type(exc).__name__}: {exc}"
            say(f"LiteLLM unavailable, measuring without it: {self.litellm_error}")
            litellm = next((p for n, p in self.children if n == "litellm"), None)
            if litellm is not None:
                processes.stop(litellm)
                self.children[:] = [(n, p) for n, p in self.children if p is not litellm]

    def cpu_groups(self) -> dict[str, list[int]]:
        groups = super().cpu_groups()
        for name in ("fake upstream", "litellm"):
            pid = self.pid(name)
            if pid:
                groups[name] = [pid, *child_pids(pid)]
        return groups

    def targets(self) -> list[Target]:
        ours_groups = ("web (gunicorn workers)", "redis", "postgres backends")
        found = [
            Target("direct", "direct to the fake provider", self.upstream_port, UPSTREAM_SECRET, UPSTREAM_MODEL, ()),
            Target("ours", f"our gateway ({self.database})", self.port, self.api_key, MODEL, ours_groups),
            Target(
                "floor",
                "our web stack's floor (GET -> JSON 404)",
                self.port,
                self.api_key,
                MODEL,
                ours_groups,
                method="GET",
                path=FLOOR_PATH,
                expect_status=404,
                streams=False,
            ),
        ]
        if not self.litellm_error:
            found.append(Target("litellm", "LiteLLM proxy", self.litellm_port, LITELLM_MASTER_KEY, MODEL, ("litellm",)))
        return found


def wait_for_http(stack: Stack, port: int, path: str, headers: dict[str, str]) -> None:
    """Until GET `path` answers 200 (or a child dies, or READY_TIMEOUT_S passes)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        stack.check_children()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path, headers=headers)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"127.0.0.1:{port}{path} not answering after {READY_TIMEOUT_S} s; see {stack.logs}")
        time.sleep(0.2)


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


def spawn_clean(argv: list[str], cwd: Path, log_path: Path) -> subprocess.Popen:
    """LiteLLM reads DATABASE_URL, REDIS_* and provider keys from its environment: start
    it with a bare one, so this benchmark's settings cannot turn its database or cache on.
    The model price map is the copy in the wheel (nothing fetched at start-up)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONUNBUFFERED"] = "1"
    output = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=processes.die_with_parent,
    )


# ---------------------------------------------------------------- load generator


class CallError(Exception):
    """One failed request: its kind (for counting) and a detail (for the samples)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass
class Timing:
    total_s: float
    first_chunk_s: float | None = None  # streaming only: to the first event with content


def sse_events(response: http.client.HTTPResponse) -> Iterator[tuple[float, bytes]]:
    """(arrival time, raw event) as bytes come off the socket (read1: no waiting for more)."""
    buffer = b""
    while chunk := response.read1(65536):
        now = time.perf_counter()
        buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            yield now, event


def read_plain(response: http.client.HTTPResponse) -> None:
    body = response.read()
    try:
        text = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise CallError("wrong body", body[:300].decode("utf-8", "replace")) from None
    if text != ANSWER_TEXT:
        raise CallError("wrong text", repr(text)[:300])


def read_stream(response: http.client.HTTPResponse, t0: float) -> float:
    """Read the whole SSE stream; the time to its first content chunk."""
    first = None
    pieces: list[str] = []
    for arrived, event in sse_events(response):
        data = event.removeprefix(b"data:").strip()
        if not data or event.startswith(b":"):
            continue
        if data == b"[DONE]":
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            raise CallError("bad event", data[:300].decode("utf-8", "replace")) from None
        if "error" in chunk:
            raise CallError("error event", json.dumps(chunk["error"])[:300])
        for choice in chunk.get("choices") or []:
            if text := (choice.get("delta") or {}).get("content"):
                first = first or arrived
                pieces.append(text)
    else:
        raise CallError("no [DONE]", "".join(pieces)[:300])
    response.read()  # the rest (the last chunk's terminator), so the connection can be reused
    if "".join(pieces) != ANSWER_TEXT or first is None:
        raise CallError("wrong text", repr("".join(pieces))[:300])
    return first - t0


class Client:
    """One client: a keep-alive connection, reopened after any failure."""

    def __init__(self, target: Target, stream: bool) -> None:
        self.target = target
        self.stream = stream
        self.body = target.body(stream)
        self.headers = target.headers()
        self.conn = self.connect()

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.target.port, timeout=REQUEST_TIMEOUT_S)

    def call(self) -> Timing:
        t0 = time.perf_counter()
        try:
            body = self.body if self.target.method == "POST" else None
            self.conn.request(self.target.method, self.target.path, body=body, headers=self.headers)
            response = self.conn.getresponse()
            if response.status != self.target.expect_status:
                raise CallError(f"HTTP {response.status}", response.read()[:300].decode("utf-8", "replace"))
            first = None
            if self.target.expect_status != 200:
                response.read()
            elif self.stream:
                first = read_stream(response, t0)
            else:
                read_plain(response)
            return Timing(time.perf_counter() - t0, first)
        except CallError:
            self.reopen()
            raise
        except (OSError, http.client.HTTPException) as exc:
            self.reopen()
            raise CallError(type(exc).__name__, str(exc)) from None

    def reopen(self) -> None:
        self.conn.close()
        self.conn = self.connect()

    def close(self) -> None:
        self.conn.close()


@dataclass
class Outcome:
    """What a batch of calls from several clients gave."""

    timings: list[Timing] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    attempted: int = 0


def run_clients(clients: list[Client], n: int, stop: threading.Event | None = None) -> Outcome:
    """n calls shared by the clients (a thread each); with `stop`, until it is set."""
    outcome = Outcome()
    lock = threading.Lock()
    remaining = iter(range(n))

    def work(client: Client) -> None:
        mine: list[Timing] = []
        while stop is None or not stop.is_set():
            with lock:
                if next(remaining, None) is None:
                    break
                outcome.attempted += 1
            try:
                mine.append(client.call())
            except CallError as exc:
                with lock:
                    outcome.errors[exc.kind] += 1
                    if len(outcome.error_samples) < 10:
                        outcome.error_samples.append(str(exc)[:300])
        with lock:
            outcome.timings.extend(mine)

    outcome.wall_s = run_in_threads(work, clients)
    return outcome


# ---------------------------------------------------------------- measurement


def latency_summary(values_s: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values_s)
    if not ms:
        return {key: float("nan") for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")}
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(ms[-1], 3),
        "mean_ms": round(sum(ms) / len(ms), 3),
    }


def measure(stack: GatewayStack, target: Target, clients: int, n: int, warmup: int, stream: bool, quiet: float) -> dict:
    """Warm up, then n calls from `clients` threads, with per-process CPU metered."""
    pool = [Client(target, stream) for _ in range(clients)]
    try:
        busy_before = wait_for_quiet(quiet)
        warm = run_clients(pool, max(warmup, 2 * clients))
        with CpuMeter(stack) as meter:
            outcome = run_clients(pool, n)
    finally:
        for client in pool:
            client.close()
    ok = len(outcome.timings)
    case = {
        "target": target.name,
        "case": f"{target.label}, {clients} client{'s' if clients > 1 else ''}" + (", stream" if stream else ""),
        "clients": clients,
        "stream": stream,
        "requests": outcome.attempted,
        "ok": ok,
        "errors": sum(outcome.errors.values()),
        "warmup_requests": warm.attempted,
        "warmup_errors": sum(warm.errors.values()),
        "error_kinds": dict(outcome.errors + warm.errors),
        "error_samples": (warm.error_samples + outcome.error_samples)[:10],
        **latency_summary([t.total_s for t in outcome.timings]),
        "wall_s": round(outcome.wall_s, 3),
        "requests_per_s": round(ok / outcome.wall_s, 1) if outcome.wall_s > 0 and ok else float("nan"),
        "machine_busy_share_before": round(busy_before, 3),
    }
    if stream:
        firsts = [t.first_chunk_s for t in outcome.timings if t.first_chunk_s is not None]
        case["first_chunk"] = latency_summary(firsts)
    case.update(meter.report(ok))
    own = [v for k, v in case["cpu_ms_per_request"].items() if k in target.groups]
    case["hop_cpu_ms_per_request"] = round(sum(own), 3) if target.groups else None
    case["upstream_cpu_ms_per_request"] = case["cpu_ms_per_request"].get("fake upstream")
    return case


def add_overheads(cases: list[dict]) -> None:
    """Each gateway case's added latency over the direct case of the same shape."""
    direct = {(c["clients"], c["stream"]): c for c in cases if c["target"] == "direct"}
    for case in cases:
        base = direct.get((case["clients"], case["stream"]))
        if base is None or case is base:
            continue
        case["added_p50_ms"] = round(case["p50_ms"] - base["p50_ms"], 3)
        case["added_p99_ms"] = round(case["p99_ms"] - base["p99_ms"], 3)
        if case["stream"]:
            case["added_first_chunk_p50_ms"] = round(case["first_chunk"]["p50_ms"] - base["first_chunk"]["p50_ms"], 3)


def run_cases(stack: GatewayStack, args: argparse.Namespace) -> list[dict]:
    """Every target at each concurrency, the direct call first; then one streaming client."""
    cases = []
    plan = [(clients, args.requests, False) for clients in CONCURRENCIES]
    if args.stream_requests:
        plan.append((1, args.stream_requests, True))
    for clients, n, stream in plan:
        for target in stack.targets():
            if stream and not target.streams:
                continue
            case = measure(stack, target, clients, n, args.warmup, stream, args.quiet_wait)
            say(
                f"{case['case']}: p50 {case['p50_ms']:.2f} ms, p99 {case['p99_ms']:.2f} ms, "
                f"{case['requests_per_s']:.0f} req/s, {case['errors']} errors"
            )
            cases.append(case)
            stack.check_children()
    add_overheads(cases)
    return cases


def measure_stages(stack: GatewayStack, n: int, warmup: int) -> dict:
    """Our gateway's stages, timed in-process by bench/gateway_stages.py (a child with
    the stack's environment: same config, database and fake provider)."""
    target = next(t for t in stack.targets() if t.name == "ours")
    argv = [sys.executable, str(ROOT / "bench" / "gateway_stages.py"), "--key", stack.api_key, "--model", MODEL]
    argv += ["--body", target.body(False).decode(), "--requests", str(n), "--warmup", str(warmup)]
    argv += ["--floor-path", FLOOR_PATH]
    done = subprocess.run(argv, cwd=ROOT, env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def find(cases: list[dict], target: str, clients: int, stream: bool = False) -> dict | None:
    return next((c for c in cases if (c["target"], c["clients"], c["stream"]) == (target, clients, stream)), None)


def aims(cases: list[dict], litellm_error: str) -> list[str]:
    """The issue's two aims, each with what was measured and whether it is met."""
    lines = []
    ours_1 = find(cases, "ours", 1)
    if ours_1:
        met = ours_1["added_p50_ms"] <= AIM_ADDED_P50_MS_1_CLIENT
        lines.append(
            f"aim: our added p50 <= {AIM_ADDED_P50_MS_1_CLIENT:g} ms at 1 client: measured "
            f"{ours_1['added_p50_ms']:.2f} ms -> {'met' if met else 'NOT met'}"
        )
    ours_32, litellm_32 = find(cases, "ours", 32), find(cases, "litellm", 32)
    if ours_32 and litellm_32:
        times = ours_32["requests_per_s"] / litellm_32["requests_per_s"]
        met = times >= AIM_RATIO_VS_LITELLM_32_CLIENTS
        lines.append(
            f"aim: our req/s >= {AIM_RATIO_VS_LITELLM_32_CLIENTS:g}x LiteLLM's at 32 clients: measured "
            f"{ours_32['requests_per_s']:.0f} / {litellm_32['requests_per_s']:.0f} = {times:.1f}x -> "
            + ("met" if met else "NOT met")
        )
    else:
        lines.append(f"aim: throughput vs LiteLLM at 32 clients: not measured (LiteLLM: {litellm_error or 'absent'})")
    return lines


# ---------------------------------------------------------------- profiling


PROFILE_RATE_HZ = 100  # 200 Hz over 64 threads falls behind on a busy 2-core machine


def profile_ours(stack: GatewayStack, clients: int, seconds: int, database: str) -> dict:
    """py-spy (threads not sleeping, PROFILE_RATE_HZ) on each gunicorn worker while
    `clients` threads keep calling our gateway; summarised like roundtrip.py's profiles."""
    from roundtrip import summarise_speedscope

    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        return {"error": "py-spy not found next to this Python"}
    target = next(t for t in stack.targets() if t.name == "ours")
    pool = [Client(target, False) for _ in range(clients)]
    stop = threading.Event()
    box: dict[str, Outcome] = {}
    loader = threading.Thread(target=lambda: box.update(outcome=run_clients(pool, 10**7, stop)), daemon=True)
    out_dir = Path(tempfile.mkdtemp(prefix="dla-bench-gw-profile-"))
    recorded = []
    try:
        loader.start()
        time.sleep(1.0)
        for i, pid in enumerate(stack.web_worker_pids()):
            label = f"web{i + 1}"
            path = out_dir / f"gateway_overhead-{database}-{clients}c-{label}.speedscope.json"
            recorded.append((label, pid, path, record_py_spy(stack, py_spy, pid, seconds, path, out_dir / label)))
        for _label, _pid, _path, spy in recorded:
            finish_py_spy(spy, seconds)
    finally:
        stop.set()
        loader.join(REQUEST_TIMEOUT_S + 5)
        for client in pool:
            client.close()
        stack.children[:] = [(n, p) for n, p in stack.children if not n.startswith("py-spy")]
    outcome = box.get("outcome", Outcome())
    summary: dict[str, Any] = {
        "clients": clients,
        "seconds": seconds,
        "rate_hz": PROFILE_RATE_HZ,
        "mode": "threads not sleeping (py-spy default, --nonblocking)",
        "requests_per_s_under_py_spy": round(len(outcome.timings) / outcome.wall_s, 1) if outcome.wall_s else None,
        "errors": sum(outcome.errors.values()),
        "processes": {},
    }
    for label, pid, path, _spy in recorded:
        entry: dict[str, Any] = {"pid": pid}
        if not path.exists():
            entry["error"] = f"py-spy wrote nothing; see {out_dir / (label + '.log')}"
        else:
            entry.update(summarise_speedscope(path, top=30))
            entry["speedscope"] = keep_profile(path)
        summary["processes"][label] = entry
    if all(not str(e.get("speedscope", out_dir)).startswith(str(out_dir)) for e in summary["processes"].values()):
        shutil.rmtree(out_dir, ignore_errors=True)  # everything worth keeping is in bench/results
    return summary


def record_py_spy(stack: Stack, py_spy: Path, pid: int, seconds: int, path: Path, log: Path) -> subprocess.Popen:
    argv = [str(py_spy), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(PROFILE_RATE_HZ)]
    argv += ["--format", "speedscope", "--output", str(path), "--nonblocking"]
    spy = processes.spawn(argv, log_path=log.with_suffix(".log"))
    stack.children.append((f"py-spy {pid}", spy))
    return spy


def finish_py_spy(spy: subprocess.Popen, seconds: int) -> None:
    """py-spy that fell behind keeps sampling past its duration: interrupt it, which
    still writes what it has."""
    try:
        spy.wait(seconds * 3 + 30)
    except subprocess.TimeoutExpired:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            processes.stop(spy)


def keep_profile(path: Path) -> str:
    """Small profiles are copied next to the JSON (git ignores them); big ones stay in /tmp."""
    if path.stat().st_size >= PROFILE_KEEP_MAX_BYTES:
        return str(path)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    kept = RESULTS_DIR / path.name
    shutil.copyfile(path, kept)
    return str(kept.relative_to(ROOT))


# ---------------------------------------------------------------- output


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def print_cases(cases: list[dict]) -> None:
    header = ["case", "ok", "err", "p50 ms", "p90 ms", "p99 ms", "req/s", "+p50 ms", "+p99 ms", "hop CPU ms/req"]
    header.append("others")
    rows = []
    for c in cases:
        if c["stream"]:
            continue
        rows.append(
            [
                c["case"],
                str(c["ok"]),
                str(c["errors"]),
                fmt(c["p50_ms"]),
                fmt(c["p90_ms"]),
                fmt(c["p99_ms"]),
                fmt(c["requests_per_s"], 0),
                fmt(c.get("added_p50_ms")),
                fmt(c.get("added_p99_ms")),
                fmt(c["hop_cpu_ms_per_request"]),
                f"{100 * c['other_processes_cpu_share']:.0f}%",
            ]
        )
    print_table(header, rows)
    print(
        "+p50/+p99: added to the direct call at the same concurrency; hop CPU: the gateway's own processes; "
        "others: machine CPU taken by processes outside this benchmark meanwhile (large = contaminated)"
    )
    streamed = [c for c in cases if c["stream"]]
    if streamed:
        print("\nstreaming (stream: true), 1 client: time to first content chunk and to [DONE]")
        header = ["case", "ok", "err", "first chunk p50", "p99", "+p50", "done p50", "p99"]
        rows = [
            [
                c["case"],
                str(c["ok"]),
                str(c["errors"]),
                fmt(c["first_chunk"]["p50_ms"]),
                fmt(c["first_chunk"]["p99_ms"]),
                fmt(c.get("added_first_chunk_p50_ms")),
                fmt(c["p50_ms"]),
                fmt(c["p99_ms"]),
            ]
            for c in streamed
        ]
        print_table(header, rows)


def print_cpu(cases: list[dict]) -> None:
    print(f"\nCPU ms per request by process (from /proc; {os.cpu_count()} CPUs shared by everything here):")
    for c in cases:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in c["cpu_ms_per_request"].items() if v >= 0.005)
        print(
            f"  {c['case']}: {parts}; machine busy {100 * c['machine_cpu_busy_share']:.0f}% "
            f"(other processes {100 * c['other_processes_cpu_share']:.0f}%)"
        )


def print_stages(stages: dict, http_p50_ms: float | None, floor_http_p50_ms: float | None) -> None:
    if "error" in stages:
        print(f"\nour gateway's stages: failed: {stages['error']}")
        return
    total = stages["in_process_total_ms"]
    print(
        f"\nour gateway's stages, in-process (Django test client, 1 at a time, {stages['requests']} requests, "
        f"{stages['database_vendor']}; {'/'.join(map(str, stages['sql_statements_per_request']))} SQL statements "
        f"per request, {stages['sql_ms']['p50']:.2f} ms in them at p50; "
        f"{'/'.join(map(str, stages['commits_per_request']))} COMMITs, {stages['commit_ms']['p50']:.2f} ms at p50):"
    )
    rows = [[label, fmt(s.get("p50")), fmt(s.get("mean"))] for label, s in stages["stages_ms"].items()]
    rows.append(["rest: " + stages["rest_is"], fmt(stages["rest_ms"]["p50"]), fmt(stages["rest_ms"]["mean"])])
    rows.append(["total in-process", fmt(total["p50"]), fmt(total["mean"])])
    if http_p50_ms is not None:
        rows.append(["HTTP through gunicorn, 1 client (from the table above)", fmt(http_p50_ms), ""])
    floor = stages.get("floor_in_process_ms") or {}
    if floor:
        rows.append([f"floor in-process: GET {FLOOR_PATH} -> JSON 404", fmt(floor.get("p50")), fmt(floor.get("mean"))])
    if floor_http_p50_ms is not None:
        rows.append(["floor through gunicorn, 1 client (from the table above)", fmt(floor_http_p50_ms), ""])
    print_table(["stage", "p50 ms", "mean ms"], rows)


def print_profile(summary: dict) -> None:
    if "error" in summary:
        print(f"\nprofile: {summary['error']}")
        return
    print(
        f"\nprofile: py-spy {summary['seconds']} s at {summary['rate_hz']} Hz on each gunicorn worker under "
        f"{summary['clients']} client(s) ({summary['requests_per_s_under_py_spy']} req/s under py-spy)"
    )
    for label, entry in summary["processes"].items():
        if "error" in entry:
            print(f"  [{label}] {entry['error']}")
            continue
        print(f"\n  [{label}] {entry['active_samples_s']} thread-s sampled ({entry['speedscope']})")
        print("    self by package: " + ", ".join(f"{p} {s}%" for s, p in entry["self_by_package"][:10]))
        print("    our code, inclusive:")
        for share, name in entry["own_code_inclusive"][:15]:
            print(f"      {share:5.1f}%  {name}")
        print("    top inclusive:")
        for share, name in entry["inclusive_top"][:25]:
            print(f"      {share:5.1f}%  {name}")


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per case (default 2000)")
    parser.add_argument(
        "--stream-requests", type=int, default=500, help="streamed requests per target at 1 client (0: skip)"
    )
    parser.add_argument("--warmup", type=int, default=100, help="warm-up requests before each case (default 100)")
    parser.add_argument(
        "--stage-requests", type=int, default=500, help="requests for the in-process stage timing (0: skip)"
    )
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--skip-litellm", action="store_true", help="measure only direct and ours")
    parser.add_argument("--profile", action="store_true", help="afterwards, py-spy our gunicorn workers under load")
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--quiet-wait", type=float, default=30, help="wait up to S s for a quiet machine per case")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp data dir (logs) even on success")
    parser.add_argument("--out", type=Path, help="the JSON to write (default bench/results/gateway_overhead*.json)")
    args = parser.parse_args()
    if args.requests < 1 or min(args.stream_requests, args.stage_requests, args.warmup) < 0:
        parser.error("--requests must be positive, --stream-requests and --warmup not negative")
    return args


def measure_all(stack: GatewayStack, args: argparse.Namespace) -> tuple[list[dict], dict | None, list[dict] | None]:
    """Against a started stack: the cases, our stages in-process, and the profiles."""
    say(f"ready; {args.requests} requests per case")
    cases = run_cases(stack, args)
    stages = None
    if args.stage_requests:
        say(f"timing our gateway's stages in-process ({args.stage_requests} requests)")
        stages = measure_stages(stack, args.stage_requests, args.warmup)
    profile = None
    if args.profile:
        profile = []
        for clients in CONCURRENCIES:
            say(f"profiling our gunicorn workers for {args.profile_seconds} s under {clients} client(s)")
            profile.append(profile_ours(stack, clients, args.profile_seconds, args.database))
    return cases, stages, profile


def result_json(stack: GatewayStack, args: argparse.Namespace, cases: list[dict], aim_lines: list[str]) -> dict:
    ours_32, litellm_32 = find(cases, "ours", 32), find(cases, "litellm", 32)
    return {
        "benchmark": "gateway_overhead",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(("Django", "djangorestframework", "gunicorn", "httpx", "redis", "psycopg")),
        "config": {
            "database": args.database,
            "database_url": redact(stack.database_url) if stack.database_url else "sqlite (temp data dir, WAL)",
            "postgres_server_version": stack.postgres_server_version or None,
            "redis": "embedded (unix socket)" if stack.embedded_redis else redact(stack.redis_url),
            "ours": f"gunicorn gthread, {WEB_WORKERS} workers x {WEB_THREADS} threads (config defaults), "
            "access log on, no Celery worker",
            "web_workers": WEB_WORKERS,
            "web_threads": WEB_THREADS,
            "litellm": {
                "version": stack.litellm_version or None,
                "workers": 1,
                "error": stack.litellm_error or None,
                "install": " && ".join(LITELLM_INSTALL),
                "run": "litellm --config litellm.yaml --host 127.0.0.1 --port P "
                "(defaults: 1 uvicorn worker, access log on); master key, no database; "
                "env: LITELLM_LOCAL_MODEL_COST_MAP=True, nothing else",
                "config_yaml": litellm_config_yaml(stack.upstream_port),
            },
            "upstream": "bench/fake_upstream.py (stdlib ThreadingHTTPServer, HTTP/1.1 keep-alive, fixed answer)",
            "load_generator": "a thread + keep-alive http.client connection per client, in this process",
            "request": json.loads(stack.targets()[1].body(False)),
            "requests_per_case": args.requests,
            "stream_requests": args.stream_requests,
            "warmup": args.warmup,
            "concurrencies": list(CONCURRENCIES),
            "toml": stack.config_text,
        },
        "aims": {
            "added_p50_ms_1_client_max": AIM_ADDED_P50_MS_1_CLIENT,
            "throughput_ratio_vs_litellm_32_clients_min": AIM_RATIO_VS_LITELLM_32_CLIENTS,
            "throughput_ratio_vs_litellm_32_clients": (
                round(ours_32["requests_per_s"] / litellm_32["requests_per_s"], 2) if ours_32 and litellm_32 else None
            ),
            "statements": aim_lines,
        },
        "cases": cases,
        "errors_total": sum(c["errors"] + c["warmup_errors"] for c in cases),
    }


def main() -> int:
    args = parse_args()
    install_signal_handlers()
    tmp = Path(tempfile.mkdtemp(prefix="dla-bench-gw-"))
    stack = GatewayStack(args.database, tmp, args.skip_litellm)
    measured, exit_code = run_on_stack(stack, tmp, args.keep_tmp, lambda: measure_all(stack, args))
    if measured is None:
        return exit_code
    cases, stages, profile = measured

    print(
        f"\ngateway overhead: POST /v1/chat/completions ({len(PROMPT)}-char prompt, max_tokens {MAX_TOKENS}); "
        f"ours: gunicorn gthread {WEB_WORKERS}x{WEB_THREADS}, {args.database}; "
        f"LiteLLM {stack.litellm_version or '-'} (1 worker)"
        + (f" UNAVAILABLE: {stack.litellm_error}" if stack.litellm_error else "")
        + f"; {os.cpu_count()} CPUs\n"
    )
    print_cases(cases)
    print_cpu(cases)
    if stages:
        ours_1, floor_1 = find(cases, "ours", 1), find(cases, "floor", 1)
        print_stages(stages, ours_1["p50_ms"] if ours_1 else None, floor_1["p50_ms"] if floor_1 else None)
    aim_lines = aims(cases, stack.litellm_error)
    print()
    for line in aim_lines:
        print(line)
    for summary in profile or []:
        print_profile(summary)
    result = result_json(stack, args, cases, aim_lines)
    result["stages_in_process"] = stages
    result["profile"] = profile
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS_DIR / (
        "gateway_overhead.json" if args.database == "sqlite" else "gateway_overhead-postgres.json"
    )
    out.write_text(json.dumps(no_nan(result), indent=2) + "\n")
    print(f"\nwrote {out}")
    if result["errors_total"]:
        print(f"\n!!! {result['errors_total']} REQUEST ERRORS: this run's numbers are not valid")
        for c in cases:
            for sample in c["error_samples"][:3]:
                print(f"!!!   [{c['case']}] {sample}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
