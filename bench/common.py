"""What every benchmark here shares: a real server stack in a temp data dir, /proc CPU
accounting, machine facts for the JSON, and small output helpers.

A benchmark script imports this module by name (`python bench/<name>.py` puts bench/ on
sys.path); importing it also puts the project root on sys.path, so `djangollmapi`,
`algorithms` etc. import as they do in the server.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import requests  # noqa: E402

from djangollmapi import processes  # noqa: E402
from djangollmapi.config import ServerConfig  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
QUEUE_PREFIX = "dla.device."  # llmjobs.routing.QUEUE_PREFIX, without importing Django
DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/dla_bench"
READY_TIMEOUT_S = 120
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_VERSIONED = ("Django", "djangorestframework", "gunicorn", "celery", "kombu", "redis", "psycopg", "requests")

T = TypeVar("T")


class Stop(Exception):
    """SIGTERM unwinds like Ctrl-C, through the clean-up path."""


def raise_stop(signum, frame) -> None:
    raise Stop()


def install_signal_handlers() -> None:
    """SIGTERM raises `Stop`; Ctrl-C raises KeyboardInterrupt even when started from a
    shell that ignores SIGINT. Either way `run_on_stack` stops everything it started."""
    signal.signal(signal.SIGTERM, raise_stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def say(message: str) -> None:
    """Progress on stderr, tagged with the script's name, so stdout stays the report."""
    print(f"[{Path(sys.argv[0]).stem}] {message}", file=sys.stderr, flush=True)


def device_queue(device: str) -> str:
    return QUEUE_PREFIX + device.replace(":", "-")


def heartbeat_key(device: str) -> str:
    return f"dla:worker:{device_queue(device)}"


# ---------------------------------------------------------------- stack


class Stack:
    """Redis (embedded unless REDIS_URL), migrate, a key, one worker per device, gunicorn.

    `config_toml(tmp, port)` writes the benchmark's TOML; `devices` are the devices its
    deployments use (one `manage.py runworker` each, as `serve` starts them). The web
    tier can be restarted with other worker/thread counts (`restart_web`) while Redis,
    the database and the workers stay up.
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
        if self.embedded_redis:
            say(f"starting embedded Redis on {self.redis_url}")
            self.children.append(
                ("redis", processes.start_embedded_redis(self.tmp / "redis.sock", self.logs / "redis.log"))
            )
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
        if self.database == "postgres":
            self.postgres_server_version = ensure_postgres_database(self.database_url)
        say(f"migrating ({self.database})")
        self.manage("migrate", "--noinput", "-v", "0")
        self.api_key = (
            self.manage("createapikey", "--name", f"bench-{int(time.time())}", "--quiet").strip().splitlines()[-1]
        )
        for device in self.devices:
            say(f"starting worker for {device}")
            log_path = self.logs / f"worker-{device.replace(':', '-')}.log"
            argv = processes.manage_argv("runworker", device)
            self.children.append((f"worker {device}", processes.spawn(argv, env=self.env, log_path=log_path)))
        self.start_web(self.web_workers, self.web_threads)
        self.wait_until_ready()

    def start_web(self, workers: int, threads: int) -> None:
        """gunicorn with the flags `serve` uses (`processes.gunicorn_argv`)."""
        self.web_workers, self.web_threads = workers, threads
        say(f"starting gunicorn gthread {workers}x{threads} on {self.base_url}")
        shape = {"host": "127.0.0.1", "port": self.port, "web_workers": workers, "web_threads": threads}
        argv = processes.gunicorn_argv(ServerConfig(data_dir=self.tmp).model_copy(update=shape))
        self.children.append(("web", processes.spawn(argv, env=self.env, log_path=self.logs / "web.log")))

    def restart_web(self, workers: int, threads: int) -> None:
        """Stop gunicorn and start it again with another shape; wait until it answers."""
        web = next((p for n, p in self.children if n == "web"), None)
        if web is not None:
            processes.stop(web)
            self.children[:] = [(n, p) for n, p in self.children if p is not web]
        self.start_web(workers, threads)
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
        while True:
            self.check_children()
            try:
                requests.get(f"{self.base_url}/api/usage/", timeout=2)
                return
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"web server not ready after {READY_TIMEOUT_S} s; see {self.logs}") from None
                time.sleep(0.1)

    def check_children(self) -> None:
        for name, process in self.children:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {process.returncode}; see {self.logs}")

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
        if self.database != "postgres":
            return []
        import psycopg

        dbname = urllib.parse.urlparse(self.database_url).path.lstrip("/")
        with psycopg.connect(self.database_url, autocommit=True, connect_timeout=3) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", [dbname]
            ).fetchall()
        return [row[0] for row in rows]

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
        """Run a read-only query written with `{p}` placeholders on the stack's database.
        SQLite hands back datetimes as text and UUIDs as 32 hex digits; see `as_epoch`."""
        if self.database == "postgres":
            import psycopg

            with psycopg.connect(self.database_url, connect_timeout=3) as conn:
                return conn.execute(sql.format(p="%s"), list(params)).fetchall()
        with sqlite3.connect(f"file:{self.tmp / 'db.sqlite3'}?mode=ro", uri=True, timeout=20) as conn:
            return conn.execute(sql.format(p="?"), list(params)).fetchall()

    # -- stop

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


def as_epoch(value: Any) -> float | None:
    """A job-row timestamp as Unix seconds: SQLite gives naive UTC text, PostgreSQL aware datetimes."""
    if value is None:
        return None
    moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def ensure_postgres_database(url: str) -> str:
    """Create the bench database if it is missing; return the server version."""
    import psycopg

    parts = urllib.parse.urlparse(url)
    dbname = parts.path.lstrip("/")
    if not dbname:
        raise RuntimeError(f"DATABASE_URL {redact(url)} names no database")
    maintenance = parts._replace(path="/postgres").geturl()
    with psycopg.connect(maintenance, autocommit=True, connect_timeout=3) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname]).fetchone()
        version = conn.execute("SHOW server_version").fetchone()[0]
    if not exists:
        say(f"creating database {dbname}")
        argv = ["createdb"]
        if parts.hostname:
            argv += ["-h", parts.hostname]
        if parts.port:
            argv += ["-p", str(parts.port)]
        if parts.username:
            argv += ["-U", urllib.parse.unquote(parts.username)]
        env = {**os.environ}
        if parts.password:
            env["PGPASSWORD"] = urllib.parse.unquote(parts.password)
        subprocess.run([*argv, dbname], check=True, env=env, timeout=60)
    return version


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found += [int(p) for p in text.split()]
    except OSError:
        pass
    return sorted(set(found))


def redact(url: str) -> str:
    parts = urllib.parse.urlparse(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


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


def run_in_threads(target: Callable[[Any], None], args: Iterable[Any]) -> float:
    """`target(arg)` in a daemon thread per arg, all started together; the wall seconds
    until the last one ends (joined with a timeout, so Ctrl-C gets through)."""
    threads = [threading.Thread(target=target, args=(arg,), daemon=True) for arg in args]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
    return time.perf_counter() - started


# ---------------------------------------------------------------- CPU accounting


def proc_cpu_s(pid: int) -> float:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_sys_s(pid: int) -> float:
    """Kernel time only (syscalls: fsync, socket I/O, futex)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    return int(text[text.rindex(")") + 2 :].split()[12]) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


class CpuMeter:
    """CPU seconds per process group and the machine's busy share over one case."""

    def __init__(self, stack: Stack | None) -> None:
        self.stack = stack

    def __enter__(self) -> CpuMeter:
        self.groups = self.stack.cpu_groups() if self.stack else {}
        self.before = {pid: proc_cpu_s(pid) for pids in self.groups.values() for pid in pids}
        self.before_sys = {pid: proc_sys_s(pid) for pids in self.groups.values() for pid in pids}
        self.client_before = time.process_time()
        self.machine_before = machine_cpu()
        self.load_before = os.getloadavg()[0]
        return self

    def __exit__(self, *exc) -> None:
        self.client_s = time.process_time() - self.client_before
        busy1, total1 = machine_cpu()
        busy0, total0 = self.machine_before
        self.machine_busy = (busy1 - busy0) / max(1, total1 - total0)
        self.load_after = os.getloadavg()[0]
        if self.stack:
            later = self.stack.cpu_groups()  # pool connections may have opened meanwhile
            for name, pids in later.items():
                self.groups[name] = sorted(set(self.groups.get(name, [])) | set(pids))
        self.sys_seconds = {
            name: sum(proc_sys_s(pid) - self.before_sys.get(pid, 0.0) for pid in pids)
            for name, pids in self.groups.items()
        }
        self.seconds = {
            name: sum(proc_cpu_s(pid) - self.before.get(pid, 0.0) for pid in pids) for name, pids in self.groups.items()
        }
        ours = sum(self.seconds.values()) + self.client_s
        machine_busy_s = (busy1 - busy0) / CLK_TCK
        machine_total_s = (total1 - total0) / CLK_TCK
        # CPU burnt by processes that are not part of this benchmark (other jobs on a
        # shared machine): when it is large, the timings are contaminated.
        self.foreign_share = max(0.0, machine_busy_s - ours) / max(1e-9, machine_total_s)

    def report(self, requests_done: int) -> dict:
        per_request = {name: 1000 * s / max(1, requests_done) for name, s in self.seconds.items()}
        per_request["bench client (this process)"] = 1000 * self.client_s / max(1, requests_done)
        return {
            "cpu_ms_per_request": {k: round(v, 4) for k, v in per_request.items()},
            "cpu_sys_ms_per_request": {
                name: round(1000 * s / max(1, requests_done), 4) for name, s in getattr(self, "sys_seconds", {}).items()
            },
            "machine_cpu_busy_share": round(self.machine_busy, 3),
            "other_processes_cpu_share": round(self.foreign_share, 3),
            "loadavg_1m_before_after": [round(self.load_before, 2), round(self.load_after, 2)],
        }


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25) -> float:
    """On a shared machine, wait (at most max_wait_s) until the whole machine is under
    `threshold` busy for a second while our stack idles; return the last busy share."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy0, total0 = machine_cpu()
        time.sleep(1.0)
        busy1, total1 = machine_cpu()
        share = (busy1 - busy0) / max(1, total1 - total0)
        if share < threshold or time.monotonic() >= deadline:
            if share >= threshold:
                say(f"machine still {100 * share:.0f}% busy with other work; measuring anyway")
            return share
        say(f"machine {100 * share:.0f}% busy with other work; waiting for it to calm down")
        time.sleep(2.0)


# ---------------------------------------------------------------- numbers and output


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest rank."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns as wide as their widest cell; the first left-aligned, the others right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def machine_info(dists: Iterable[str] = DEFAULT_VERSIONED) -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in dists:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "versions": versions,
        "git_commit": commit or None,
    }


def no_nan(value):
    """NaN (a case with no successful request) as null, so the file is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [no_nan(v) for v in value]
    return value
