"""The server stack every benchmark runs against, started and stopped the way `serve` does.

`Stack` takes a temp data dir and a TOML writer, and starts: Redis (embedded on a unix
socket, or REDIS_URL), the database (SQLite in the data dir, or PostgreSQL, created if
missing), `manage.py migrate`, a key from `manage.py createapikey`, one
`manage.py runworker <device>` per device, and gunicorn with `processes.gunicorn_argv`.
It names its processes for the CPU accounting (`cpu_groups`) and can read the job rows
(diagnostics). `run_on_stack` starts it, runs the measurement and stops every child
whatever happens.

A benchmark script imports this module by name (`python bench/<name>.py` puts bench/ on
sys.path); importing it also puts the project root on sys.path, so `djangollmapi`,
`algorithms` etc. import as they do in the server.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import internals
from cpu import child_pids
from internals import device_queue, ensure_postgres_database, heartbeat_key, redact
from report import ROOT, say

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis

from djangollmapi import processes
from djangollmapi.config import ServerConfig

DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/dla_bench"
READY_TIMEOUT_S = 120

T = TypeVar("T")
WebArgv = Callable[[ServerConfig], list[str]]  # the web tier's command for a [server] shape


# ---------------------------------------------------------------- signals


class Stop(Exception):
    """SIGTERM unwinds like Ctrl-C, through the clean-up path."""


def raise_stop(signum, frame) -> None:
    raise Stop()


def install_signal_handlers() -> None:
    """SIGTERM raises `Stop`; Ctrl-C raises KeyboardInterrupt even when started from a
    shell that ignores SIGINT. Either way `run_on_stack` stops everything it started."""
    signal.signal(signal.SIGTERM, raise_stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ---------------------------------------------------------------- stack


class Stack:
    """Redis (embedded unless REDIS_URL), migrate, a key, one worker per device, gunicorn.

    `config_toml(tmp, port)` writes the benchmark's TOML; `devices` are the devices its
    deployments use (one `manage.py runworker` each, as `serve` starts them). The web
    tier can be restarted with other worker/thread counts, or as another web server
    (`restart_web`), while Redis, the database and the workers stay up.
    """

    def __init__(
        self,
        database: str,
        tmp: Path,
        config_toml: Callable[[Path, int], str],
        devices: Sequence[str],
        web_workers: int = 2,
        web_threads: int = 32,
    ) -> None:
        self.database = database
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.devices = list(devices)
        self.web_workers = web_workers
        self.web_threads = web_threads
        self.web_argv: WebArgv = processes.gunicorn_argv
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.redis_url = os.environ.get("REDIS_URL", "")
        self.embedded_redis = not self.redis_url
        if self.embedded_redis:
            self.redis_url = f"unix://{tmp / 'redis.sock'}"
        self.database_url = ""
        if database == "postgres":
            self.database_url = os.environ.get("DATABASE_URL") or DEFAULT_POSTGRES_URL
        self.config_path = tmp / "bench.toml"
        self.config_text = config_toml(tmp, self.port)
        self.env = {
            "DJANGO_LLM_API_CONFIG": str(self.config_path),
            "DJANGO_LLM_API_DATA_DIR": str(tmp),
            # An empty value means "not set" to the config loader: sqlite really is sqlite.
            "DATABASE_URL": self.database_url,
            "REDIS_URL": os.environ.get("REDIS_URL", ""),
            "DJANGO_SETTINGS_MODULE": "djangollmapi.settings",
        }
        self.api_key = ""
        self.redis_server_version = ""
        self.postgres_server_version = ""

    # -- start

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text)
        self.start_redis()
        if self.database == "postgres":
            self.postgres_server_version = ensure_postgres_database(self.database_url)
        say(f"migrating ({self.database})")
        self.manage("migrate", "--noinput", "-v", "0")
        name = f"bench-{int(time.time())}"
        self.api_key = self.manage("createapikey", "--name", name, "--quiet").strip().splitlines()[-1]
        self.start_workers()
        self.start_web(self.web_workers, self.web_threads)
        self.wait_until_ready()

    def start_workers(self) -> None:
        for device in self.devices:
            say(f"starting worker for {device}")
            log_path = self.logs / f"worker-{device.replace(':', '-')}.log"
            argv = processes.manage_argv("runworker", device)
            self.children.append((f"worker {device}", processes.spawn(argv, env=self.env, log_path=log_path)))

    def start_redis(self) -> None:
        """The embedded Redis, or REDIS_URL's, which must not already serve our devices."""
        if self.embedded_redis:
            say(f"starting embedded Redis on {self.redis_url}")
            server = processes.start_embedded_redis(self.tmp / "redis.sock", self.logs / "redis.log")
            self.children.append(("redis", server))
        else:
            say(f"using Redis at {redact(self.redis_url)} (REDIS_URL)")
            processes.wait_for_redis(self.redis_url)
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)
        self.redis_server_version = self.redis.info("server").get("redis_version", "")
        for device in self.devices:
            if self.redis.exists(heartbeat_key(device)):
                raise RuntimeError(
                    f"another worker already serves {device_queue(device)} on {redact(self.redis_url)}; "
                    "point REDIS_URL at a Redis (or db number) of its own, or unset it"
                )

    def start_web(self, workers: int, threads: int, web_argv: WebArgv | None = None) -> None:
        """gunicorn with the flags `serve` uses (`processes.gunicorn_argv`), or the
        command `web_argv` builds from the same `[server]` shape (another web server, for
        a comparison); the choice holds for later restarts."""
        self.web_workers, self.web_threads = workers, threads
        self.web_argv = web_argv or self.web_argv
        say(f"starting the web tier ({self.web_argv.__name__}) {workers}x{threads} on {self.base_url}")
        argv = self.web_argv(self.web_config(workers, threads))
        self.children.append(("web", processes.spawn(argv, env=self.env, log_path=self.logs / "web.log")))

    def web_config(self, workers: int, threads: int) -> ServerConfig:
        """The `[server]` shape the web tier is started with: this port, this size."""
        shape = {"host": "127.0.0.1", "port": self.port, "web_workers": workers, "web_threads": threads}
        return ServerConfig(data_dir=str(self.tmp)).model_copy(update=shape)

    def restart_web(self, workers: int, threads: int, web_argv: WebArgv | None = None) -> None:
        """Stop the web tier and start it again with another shape (or another
        `web_argv`); wait until it answers."""
        self.stop_child("web")
        self.start_web(workers, threads, web_argv)
        self.wait_until_ready()

    def manage(self, *args: str) -> str:
        result = subprocess.run(
            processes.manage_argv(*args),
            cwd=ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result.stdout

    def wait_until_ready(self) -> None:
        """Every worker's heartbeat (its models are loaded), then the web port answers."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(self.redis.exists(heartbeat_key(d)) for d in self.devices):
            self.check_children()
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready after {READY_TIMEOUT_S} s; see {self.logs}")
            time.sleep(0.1)
        wait_for_http(self, self.port, "/api/usage/", {}, expect_status=None)

    def check_children(self) -> None:
        for name, process in self.children:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode}; see {self.logs}")

    def describe(self, sqlite: str = "sqlite (temp data dir)") -> dict[str, Any]:
        """The stack's database and Redis, for a result file's config."""
        return {
            "database": self.database,
            "database_url": redact(self.database_url) if self.database_url else sqlite,
            "postgres_server_version": self.postgres_server_version or None,
            "redis": "embedded (unix socket)" if self.embedded_redis else redact(self.redis_url),
            "redis_server_version": self.redis_server_version,
        }

    # -- processes, for CPU and memory accounting and profiling

    def pid(self, name: str) -> int | None:
        return next((p.pid for n, p in self.children if n == name), None)

    def worker_pid(self, device: str) -> int | None:
        """The Celery parent of `device`'s worker (its one pool child runs the jobs)."""
        return self.pid(f"worker {device}")

    def web_worker_pids(self) -> list[int]:
        master = self.pid("web")
        return child_pids(master) if master else []

    def celery_child_pids(self, device: str) -> list[int]:
        parent = self.worker_pid(device)
        return child_pids(parent) if parent else []

    def postgres_backend_pids(self) -> list[int]:
        return internals.postgres_backend_pids(self.database_url) if self.database == "postgres" else []

    def cpu_groups(self) -> dict[str, list[int]]:
        groups = {"web (gunicorn workers)": self.web_worker_pids()}
        for device in self.devices:
            suffix = "" if len(self.devices) == 1 else f" {device}"
            groups[f"celery parent{suffix}"] = [p for p in [self.worker_pid(device)] if p]
            groups[f"celery child{suffix}"] = self.celery_child_pids(device)
        if self.embedded_redis:
            groups["redis"] = [p for p in [self.pid("redis")] if p]
        if self.database == "postgres":
            groups["postgres backends"] = self.postgres_backend_pids()
        return groups

    # -- the database, read directly (diagnostics only)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """A read-only query with `{p}` placeholders on the stack's database (`internals.query`)."""
        return internals.query(self.database, self.database_url, self.tmp, sql, params)

    # -- stop

    def stop_child(self, name: str) -> None:
        """Stop the child called `name` (if running) and forget it."""
        child = next((p for n, p in self.children if n == name), None)
        if child is not None:
            processes.stop(child)
            self.children[:] = [(n, p) for n, p in self.children if p is not child]

    def stop(self) -> None:
        for name, process in reversed(self.children):
            try:
                processes.stop(process)
            except Exception as exc:  # keep stopping the others
                say(f"stopping {name} failed: {exc}")
        self.children.clear()


def run_on_stack(stack: Stack, tmp: Path, keep_tmp: bool, work: Callable[[], T]) -> tuple[T | None, int | None]:
    """Start `stack`, run `work`, check that no child died meanwhile, and stop the stack
    whatever happens. Return (work's result, None), or (None, the exit code) after an
    interrupt (130) or a failure (2), said on stderr. `tmp` (the stack's data dir) is
    removed only on success, and not with `keep_tmp`: after a failure its logs stay."""
    failed = True
    try:
        stack.start()
        result = work()
        stack.check_children()
        failed = False
        return result, None
    except (KeyboardInterrupt, Stop):
        say(f"interrupted; stopping everything (logs kept in {stack.logs})")
        return None, 130
    except Exception as exc:
        say(f"FAILED: {type(exc).__name__}: {exc}")
        say(f"logs kept in {stack.logs}")
        return None, 2
    finally:
        stack.stop()
        if not failed and not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- helpers


def wait_for_http(
    stack: Stack, port: int, path: str, headers: Mapping[str, str], expect_status: int | None = 200
) -> None:
    """Until GET `path` answers (with `expect_status`, unless None), a child dies, or
    READY_TIMEOUT_S passes."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        stack.check_children()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path, headers=dict(headers))
            if expect_status is None or conn.getresponse().status == expect_status:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise RuntimeError(f"127.0.0.1:{port}{path} not answering after {READY_TIMEOUT_S} s; see {stack.logs}")
        time.sleep(0.1)


def spawn_bare(argv: list[str], cwd: Path, env: Mapping[str, str], log_path: Path) -> subprocess.Popen:
    """A child with exactly `env` (nothing inherited), in its own session, output to
    `log_path`, and that gets SIGTERM when this process dies (as `processes.spawn` does)."""

    def die_with_parent() -> None:
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    output = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=dict(env),
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepared_model(models_dir: Path, name: str) -> Path:
    """A built-in model's folder (`manage.py preparemodels`' name for it) under
    `models_dir`, converted once if missing (~30 s for SmolLM2)."""
    from algorithms.prepare import is_prepared, prepare_model

    path = models_dir / name
    if not is_prepared(path):
        say(f"preparing {name} in {models_dir} (once, ~30 s)")
        prepare_model(name, models_dir, progress=say)
    return path


def server_toml(written_by: str, tmp: Path, port: int, **settings: str | int) -> str:
    """The head of every benchmark's config: who wrote it and its [server] table, with
    `settings` (strings quoted) after data_dir, host and port."""
    lines = [f"# written by bench/{written_by}", "[server]", f'data_dir = "{tmp}"', 'host = "127.0.0.1"']
    lines.append(f"port = {port}")
    lines += [f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def deployment_toml(name: str, algorithm: str, device: str, options: str = "") -> str:
    """One [[deployments]] table, after a blank line; `options` is the inline table's inside."""
    text = f'\n[[deployments]]\nname = "{name}"\nalgorithm = "{algorithm}"\ndevice = "{device}"\n'
    return text + (f"options = {{ {options} }}\n" if options else "")
