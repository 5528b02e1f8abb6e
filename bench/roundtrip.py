"""Round trip of `POST /api/` against calling the algorithm in-process.

Starts its own stack in a temporary data dir (embedded Redis on a unix socket unless
REDIS_URL is set, SQLite or PostgreSQL, one `cpu` Celery worker, gunicorn gthread with
2 workers x 32 threads as `manage.py serve` does), then measures in ONE run:

  (a) `algorithms.echo:Echo().run(text)` in-process, N times;
  (b) `POST /api/` from 1 client (sequential, keep-alive session);
  (c) `POST /api/` from 16 concurrent clients (a thread and a session each).

Every response must be 200 with the echoed text; any error is counted, reported
loudly, and makes the exit status non-zero. Prints a table, writes
`bench/results/roundtrip-<database>.json`. With `--profile`, afterwards runs py-spy on
the gunicorn workers and the Celery processes during a 16-client load and summarises
where the time goes. Every process it starts is stopped on exit, error or Ctrl-C.

    .venv/bin/python bench/roundtrip.py [--requests N] [--database sqlite|postgres] [--profile]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests
from common import (
    RESULTS_DIR,
    ROOT,
    CpuMeter,
    Stack,
    deployment_toml,
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

# isort: split
# After `common`, which puts the project root on sys.path.
from algorithms.loader import build_algorithm
from djangollmapi import processes

ALGORITHM = "algorithms.echo:Echo"
MODEL = "echo"
DEVICE = "cpu"
WEB_WORKERS = 2
WEB_THREADS = 32
REQUEST_TIMEOUT_S = 30
AIM_P50_MS_1_CLIENT = 6.0
AIM_RPS_16_CLIENTS = 300.0
PROFILE_KEEP_MAX_BYTES = 1_000_000


# ---------------------------------------------------------------- stack


class RoundtripStack(Stack):
    """The shared stack with one `cpu` worker, plus where this benchmark reads the
    server-side stages from: the worker log and the job rows."""

    def __init__(self, database: str, tmp: Path) -> None:
        super().__init__(database, tmp, bench_config_toml, [DEVICE], WEB_WORKERS, WEB_THREADS)

    def worker_log_size(self) -> int:
        path = self.logs / "worker-cpu.log"
        return path.stat().st_size if path.exists() else 0

    def worker_task_runtimes(self, offset: int) -> list[float]:
        """Celery's INFO line per task: 'Task llmjobs.run_job[...] succeeded in 0.0123s'."""
        with open(self.logs / "worker-cpu.log", "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
        return [float(m) for m in re.findall(r"run_job\[[^\]]+\] succeeded in ([0-9.eE-]+)s", text)]

    def job_rows(self, tag: str) -> list[tuple]:
        """(created_at, started_at, finished_at) of this run's jobs whose text carries `tag`."""
        prefix = self.api_key.split("_", 2)[1]
        like = f"roundtrip {tag} #%"
        rows = self.query(
            "SELECT j.created_at, j.started_at, j.finished_at FROM llmjobs_job j "
            "JOIN apikeys_apikey k ON k.id = j.api_key_id WHERE k.prefix = {p} AND j.input_text LIKE {p}",
            [prefix, like],
        )
        parse = lambda v: dt.datetime.fromisoformat(v) if isinstance(v, str) else v  # noqa: E731
        return [tuple(parse(v) for v in row) for row in rows]


def bench_config_toml(tmp: Path, port: int) -> str:
    head = server_toml("roundtrip.py", tmp, port, web_workers=WEB_WORKERS, web_threads=WEB_THREADS, default_model=MODEL)
    return head + "\n[worker]\npreload = true\n" + deployment_toml(MODEL, ALGORITHM, DEVICE, "delay_ms = 0")


# ---------------------------------------------------------------- measurement


def summarise(name: str, latencies_s: list[float], errors: int, wall_s: float, attempted: int) -> dict:
    ms = sorted(x * 1000 for x in latencies_s)
    return {
        "case": name,
        "requests": attempted,
        "ok": len(ms),
        "errors": errors,
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1] if ms else float("nan"),
        "mean_ms": sum(ms) / len(ms) if ms else float("nan"),
        "wall_s": wall_s,
        "requests_per_s": len(ms) / wall_s if wall_s > 0 else float("nan"),
    }


def text_for(tag: str, i: int, chars: int) -> str:
    head = f"roundtrip {tag} #{i}: "
    filler = "the quick brown fox jumps over the lazy dog "
    return (head + filler * (1 + chars // len(filler)))[: max(chars, len(head))]


def measure_in_process(n: int, chars: int) -> dict:
    algorithm = build_algorithm(ALGORITHM, DEVICE, {"delay_ms": 0})
    texts = [text_for("inproc", i, chars) for i in range(n)]
    for text in texts[:50]:
        algorithm.run(text)
    latencies, errors = [], 0
    clock = time.perf_counter
    started = clock()
    for text in texts:
        t0 = clock()
        out = algorithm.run(text)
        latencies.append(clock() - t0)
        if out != text:
            errors += 1
    wall = clock() - started
    return summarise("in-process Echo().run", latencies, errors, wall, n)


class Errors:
    """Thread-safe error count with the first few samples kept for the report."""

    def __init__(self) -> None:
        self.count = 0
        self.samples: list[str] = []
        self.kinds: Counter = Counter()
        self.lock = threading.Lock()

    def add(self, kind: str, detail: str) -> None:
        with self.lock:
            self.count += 1
            self.kinds[kind] += 1
            if len(self.samples) < 10:
                self.samples.append(f"{kind}: {detail[:300]}")


def post_once(session: requests.Session, url: str, key: str, text: str, errors: Errors) -> float | None:
    """One POST /api/; its latency in seconds, or None (and an error counted)."""
    t0 = time.perf_counter()
    try:
        response = session.post(
            url,
            json={"text": text, "model": MODEL},
            headers={"Authorization": f"Bearer {key}"},
            timeout=REQUEST_TIMEOUT_S,
        )
        elapsed = time.perf_counter() - t0
    except requests.RequestException as exc:
        errors.add(type(exc).__name__, str(exc))
        return None
    if response.status_code != 200:
        errors.add(f"HTTP {response.status_code}", response.text)
        return None
    try:
        body = response.json()
    except ValueError:
        errors.add("bad JSON", response.text)
        return None
    if body.get("message") != text or body.get("model") != MODEL or not body.get("job_id"):
        errors.add("wrong body", json.dumps(body)[:300])
        return None
    return elapsed


def run_clients(
    sessions: list[requests.Session],
    url: str,
    key: str,
    n: int,
    tag: str,
    chars: int,
    stop: threading.Event | None = None,
) -> tuple[list[float], Errors, float, int]:
    """n requests shared by len(sessions) threads (one session each); or, with `stop`,
    as many as fit until it is set (n is then the ceiling)."""
    errors = Errors()
    lock = threading.Lock()
    counter = iter(range(n))
    per_thread: list[list[float]] = [[] for _ in sessions]
    attempted = [0] * len(sessions)

    def client(index: int) -> None:
        session = sessions[index]
        while stop is None or not stop.is_set():
            with lock:
                i = next(counter, None)
            if i is None:
                return
            attempted[index] += 1
            latency = post_once(session, url, key, text_for(tag, i, chars), errors)
            if latency is not None:
                per_thread[index].append(latency)

    if len(sessions) == 1:
        started = time.perf_counter()
        client(0)
        wall = time.perf_counter() - started
    else:
        wall = run_in_threads(client, range(len(sessions)))
    latencies = [x for chunk in per_thread for x in chunk]
    return latencies, errors, wall, sum(attempted)


def measure_http(
    stack: Stack, clients: int, n: int, warmup: int, chars: int, quiet_wait_s: float
) -> tuple[dict, Errors]:
    url = f"{stack.base_url}/api/"
    sessions = [requests.Session() for _ in range(clients)]
    try:
        idle_busy = wait_for_quiet(quiet_wait_s)
        _lat, warm_errors, _wall, _n = run_clients(
            sessions, url, stack.api_key, max(warmup, 2 * clients), f"warm{clients}", chars
        )
        log_offset = stack.worker_log_size()
        with CpuMeter(stack) as meter:
            latencies, errors, wall, attempted = run_clients(sessions, url, stack.api_key, n, f"c{clients}", chars)
        task_runtimes = stack.worker_task_runtimes(log_offset)
        result = summarise(
            f"POST /api/, {clients} client{'s' if clients > 1 else ''}", latencies, errors.count, wall, attempted
        )
        result["clients"] = clients
        result["warmup_requests"] = max(warmup, 2 * clients)
        result["warmup_errors"] = warm_errors.count
        result["machine_busy_share_before"] = round(idle_busy, 3)
        result["error_kinds"] = dict(errors.kinds + warm_errors.kinds)
        result["error_samples"] = (warm_errors.samples + errors.samples)[:10]
        result.update(meter.report(len(latencies)))
        result["server_stages_ms"] = server_stages(stack, f"c{clients}", task_runtimes, wall)
        errors.count += warm_errors.count
        return result, errors
    finally:
        for session in sessions:
            session.close()


def spread(values_s: list[float]) -> dict:
    ms = sorted(v * 1000 for v in values_s)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "mean": round(sum(ms) / len(ms), 3),
    }


def server_stages(stack: Stack, tag: str, task_runtimes: list[float], wall_s: float) -> dict:
    """Where a request's time goes on the server, from the job rows and the worker log:
    queue_wait = started_at - created_at (INSERT commit, enqueue, broker, prefork hand-off,
    cancel check); run = finished_at - started_at (claim UPDATE, algorithm, emit);
    celery_task = Celery's own 'succeeded in' runtime of the task body; worker_busy_share
    = sum of task runtimes / wall time (near 1: the single worker is the bottleneck)."""
    stages: dict = {}
    try:
        rows = stack.job_rows(tag)
        stages["queue_wait"] = spread([(started - created).total_seconds() for created, started, _f in rows if started])
        stages["run"] = spread(
            [(finished - started).total_seconds() for _c, started, finished in rows if started and finished]
        )
    except Exception as exc:  # diagnostics only; never fail the run for them
        stages["job_rows_error"] = f"{type(exc).__name__}: {exc}"
    stages["celery_task"] = spread(task_runtimes)
    stages["worker_busy_share"] = round(sum(task_runtimes) / wall_s, 3) if wall_s else None
    return stages


# ---------------------------------------------------------------- profiling


PROFILE_MODES = {
    # Threads the OS sees running (py-spy's default): includes time in C code that
    # released the GIL (SQLite commits, socket reads), and threads that are runnable
    # but waiting for a CPU on a busy machine.
    "active": [],
    # Only the thread holding the GIL: where Python-level CPU goes, and what the
    # threads of one gunicorn worker queue behind.
    "gil": ["--gil"],
}


def profile_under_load(stack: Stack, clients: int, seconds: int, chars: int, database: str) -> dict:
    """py-spy record on each gunicorn worker and both Celery processes while `clients`
    threads keep POSTing, once per mode in PROFILE_MODES; returns per-process
    summaries of where the samples fall."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        py_spy = Path(shutil.which("py-spy") or "")
    if not py_spy or not py_spy.exists():
        return {"error": "py-spy not found"}
    targets = [(f"web{i + 1}", pid) for i, pid in enumerate(stack.web_worker_pids())]
    targets.append(("celery-parent", stack.worker_pid(DEVICE)))
    children = stack.celery_child_pids(DEVICE)
    targets += [(f"celery-child{'' if i == 0 else i + 1}", pid) for i, pid in enumerate(children)]
    out_dir = Path(tempfile.mkdtemp(prefix="dla-bench-profile-"))
    url = f"{stack.base_url}/api/"
    stop = threading.Event()
    sessions = [requests.Session() for _ in range(clients)]
    box: dict = {}
    recorded: list[tuple[str, str, int, Path]] = []

    def load() -> None:
        box["result"] = run_clients(sessions, url, stack.api_key, 10**6, "prof", chars, stop=stop)

    loader = threading.Thread(target=load, daemon=True)
    try:
        loader.start()
        time.sleep(1.0)  # connections open, steady state
        for mode, flags in PROFILE_MODES.items():
            spies: list[subprocess.Popen] = []
            try:
                for label, pid in targets:
                    path = out_dir / f"roundtrip-{database}-{label}-{mode}.speedscope.json"
                    argv = [
                        str(py_spy),
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        str(seconds),
                        "--rate",
                        "200",
                        "--format",
                        "speedscope",
                        "--output",
                        str(path),
                        "--nonblocking",
                        *flags,
                    ]
                    spy = processes.spawn(argv, log_path=out_dir / f"{label}-{mode}.log")
                    spies.append(spy)
                    stack.children.append((f"py-spy {label} {mode}", spy))
                    recorded.append((label, mode, pid, path))
                for spy in spies:
                    spy.wait(seconds + 60)
            finally:
                for spy in spies:
                    processes.stop(spy)
                    stack.children[:] = [(n, p) for n, p in stack.children if p is not spy]
    finally:
        stop.set()
        loader.join(REQUEST_TIMEOUT_S + 5)
        for session in sessions:
            session.close()
    latencies, errors, wall, attempted = box.get("result", ([], Errors(), 0.0, 0))
    summary = {
        "clients": clients,
        "seconds_per_mode": seconds,
        "rate_hz": 200,
        "modes": {
            "active": "threads not sleeping (py-spy default, --nonblocking)",
            "gil": "only the thread holding the GIL (--gil)",
        },
        "load": {
            "requests": attempted,
            "ok": len(latencies),
            "errors": errors.count,
            "requests_per_s_under_py_spy": round(len(latencies) / wall, 1) if wall else None,
        },
        "processes": {},
    }
    for label, mode, pid, path in recorded:
        entry: dict = {"pid": pid}
        if not path.exists():
            entry["error"] = f"py-spy wrote nothing; see {out_dir / f'{label}-{mode}.log'}"
        else:
            entry.update(summarise_speedscope(path))
            size = path.stat().st_size
            if size < PROFILE_KEEP_MAX_BYTES:
                RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                kept = RESULTS_DIR / path.name
                shutil.copyfile(path, kept)
                entry["speedscope"] = str(kept.relative_to(ROOT))
            else:
                entry["speedscope"] = str(path)
            entry["speedscope_bytes"] = size
        summary["processes"].setdefault(label, {})[mode] = entry
    kept_in_tmp = any(
        str(entry.get("speedscope", "")).startswith(str(out_dir)) or "error" in entry
        for by_mode in summary["processes"].values()
        for entry in by_mode.values()
    )
    if not kept_in_tmp:  # everything worth keeping was copied to bench/results
        shutil.rmtree(out_dir, ignore_errors=True)
    return summary


def package_of(file: str) -> str:
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if file.startswith(str(ROOT) + "/"):
        return "app:" + file[len(str(ROOT)) + 1 :].split("/", 1)[0].removesuffix(".py")
    if "/lib/python3" in file:
        rest = file.split("/lib/python3", 1)[1].split("/", 1)[-1]
        return "stdlib:" + rest.split("/", 1)[0].removesuffix(".py")
    return file or "?"


ENTRY_POINTS = ("manage.py", "llmjobs/management/commands/runworker.py")


def is_own_code(file: str) -> bool:
    """The project's code, less the venv inside it and the process entry points."""
    if "site-packages/" in file or not file.startswith(str(ROOT) + "/"):
        return False
    return not file.endswith(ENTRY_POINTS)


def short_file(file: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in file:
            return file.split(marker, 1)[1]
    if "/lib/python3" in file:
        return "stdlib/" + file.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return file


def summarise_speedscope(path: Path, top: int = 15) -> dict:
    """Self and inclusive shares per function, self share per package, and the
    inclusive share of each of our own (project) functions: the request's stages."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    keys = [(f["name"], f.get("file") or "") for f in frames]
    self_w: Counter = Counter()
    incl_w: Counter = Counter()
    pkg_w: Counter = Counter()
    total = 0.0
    threads = 0
    for profile in data["profiles"]:
        if not profile.get("samples"):
            continue
        threads += 1
        for stack, weight in zip(profile["samples"], profile["weights"], strict=False):
            if not stack:
                continue
            total += weight
            leaf = keys[stack[-1]]
            self_w[leaf] += weight
            pkg_w[package_of(leaf[1])] += weight
            for key in {keys[i] for i in stack}:
                incl_w[key] += weight

    def share(counter: Counter, n: int, own_only: bool = False) -> list[list]:
        rows = []
        for (name, file), w in counter.most_common():
            if own_only and not is_own_code(file):
                continue
            rows.append([round(100 * w / total, 1), f"{name} ({short_file(file)})"])
            if len(rows) >= n:
                break
        return rows

    return {
        "active_samples_s": round(total, 2),
        "threads_seen": threads,
        "self_top": share(self_w, top),
        "inclusive_top": share(incl_w, top),
        "own_code_inclusive": share(incl_w, top, own_only=True),
        "self_by_package": [[round(100 * w / total, 1), p] for p, w in pkg_w.most_common(top)] if total else [],
    }


# ---------------------------------------------------------------- output


def fmt_ms(value: float) -> str:
    if value != value:  # nan
        return "-"
    return f"{value:.2e}" if value < 0.01 else f"{value:.2f}"


def ratio(numerator: float, denominator: float) -> str:
    if not denominator or denominator != denominator or numerator != numerator:
        return "-"
    return f"{numerator / denominator:,.0f}x"


def print_cases(cases: list[dict], baseline: dict) -> None:
    header = [
        "case",
        "requests",
        "errors",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "req/s",
        "p50 / in-proc",
        "in-proc req/s / req/s",
    ]
    rows = []
    for case in cases:
        rows.append(
            [
                case["case"],
                str(case["requests"]),
                str(case["errors"]),
                fmt_ms(case["p50_ms"]),
                fmt_ms(case["p90_ms"]),
                fmt_ms(case["p99_ms"]),
                f"{case['requests_per_s']:,.0f}" if case["requests_per_s"] == case["requests_per_s"] else "-",
                ratio(case["p50_ms"], baseline["p50_ms"]) if case is not baseline else "1x",
                ratio(baseline["requests_per_s"], case["requests_per_s"]) if case is not baseline else "1x",
            ]
        )
    print_table(header, rows)


def print_cpu(cases: list[dict]) -> None:
    print(f"\nCPU per request (ms, from /proc; the machine has {os.cpu_count()} CPUs):")
    for case in cases:
        cpu = case.get("cpu_ms_per_request")
        if not cpu:
            continue
        sys_ms = case.get("cpu_sys_ms_per_request", {})
        parts = ", ".join(f"{k} {v:.2f}" + (f" (sys {sys_ms[k]:.2f})" if k in sys_ms else "") for k, v in cpu.items())
        print(
            f"  {case['case']}: {parts}; total {sum(cpu.values()):.2f}; "
            f"machine busy {100 * case['machine_cpu_busy_share']:.0f}% "
            f"(other processes {100 * case['other_processes_cpu_share']:.0f}%); "
            f"loadavg {case['loadavg_1m_before_after'][0]} -> {case['loadavg_1m_before_after'][1]}"
        )


def print_stages(cases: list[dict]) -> None:
    print("\nServer-side stages (ms; queue_wait = job created -> worker claims it, run = claim -> finished,")
    print("celery_task = task body as Celery logs it; worker busy = share of wall time the one worker ran tasks):")
    for case in cases:
        stages = case.get("server_stages_ms")
        if not stages:
            continue
        parts = []
        for name in ("queue_wait", "run", "celery_task"):
            st = stages.get(name) or {}
            if st.get("n"):
                parts.append(f"{name} p50 {st['p50']:.2f} / p90 {st['p90']:.2f}")
        if "job_rows_error" in stages:
            parts.append(f"(job rows: {stages['job_rows_error']})")
        print(
            f"  {case['case']}: "
            + ", ".join(parts)
            + f"; worker busy {100 * (stages.get('worker_busy_share') or 0):.0f}%"
        )


def aims(one: dict, many: dict, clients: int) -> list[str]:
    met_p50 = one["p50_ms"] <= AIM_P50_MS_1_CLIENT
    met_rps = many["requests_per_s"] >= AIM_RPS_16_CLIENTS
    return [
        f"aim: p50 <= {AIM_P50_MS_1_CLIENT:g} ms at 1 client       measured {one['p50_ms']:.2f} ms   -> "
        + ("met" if met_p50 else "NOT met"),
        f"aim: >= {AIM_RPS_16_CLIENTS:g} req/s at {clients} clients   measured {many['requests_per_s']:.0f} req/s -> "
        + ("met" if met_rps else "NOT met"),
    ]


def print_profile(summary: dict) -> None:
    load = summary.get("load", {})
    print(
        f"\nprofile: py-spy {summary.get('seconds_per_mode')} s per mode at {summary.get('rate_hz')} Hz under "
        f"{summary.get('clients')} clients; {load.get('ok')} requests "
        f"({load.get('requests_per_s_under_py_spy')} req/s under py-spy), {load.get('errors')} errors"
    )
    for mode, meaning in summary.get("modes", {}).items():
        print(f"  mode {mode}: {meaning}")
    for label, by_mode in summary.get("processes", {}).items():
        for mode, entry in by_mode.items():
            if "error" in entry:
                print(f"\n  [{label} / {mode}] {entry['error']}")
                continue
            print(
                f"\n  [{label} / {mode}] pid {entry['pid']}: {entry['active_samples_s']} thread-s sampled in "
                f"{entry['threads_seen']} threads ({entry['speedscope']})"
            )
            print("    self by package: " + ", ".join(f"{p} {s}%" for s, p in entry["self_by_package"][:8]))
            print("    top self:")
            for s, name in entry["self_top"][:8]:
                print(f"      {s:5.1f}%  {name}")
            if entry["own_code_inclusive"]:
                print("    our code, inclusive:")
                for s, name in entry["own_code_inclusive"][:8]:
                    print(f"      {s:5.1f}%  {name}")


# ---------------------------------------------------------------- main


def measure_all(
    stack: RoundtripStack, args: argparse.Namespace
) -> tuple[dict, tuple[dict, Errors], tuple[dict, Errors], dict | None]:
    """All cases against a started stack: in-process, 1 client, N clients, and the profile."""
    say(f"ready; measuring {args.requests} requests per case")
    with CpuMeter(None) as meter:
        inproc = measure_in_process(args.requests, args.text_chars)
    inproc.update(meter.report(args.requests))
    say(f"in-process done: p50 {fmt_ms(inproc['p50_ms'])} ms")
    one, errors_one = measure_http(stack, 1, args.requests, args.warmup, args.text_chars, args.quiet_wait)
    say(f"1 client done: p50 {one['p50_ms']:.2f} ms, {one['requests_per_s']:.0f} req/s, {one['errors']} errors")
    many, errors_many = measure_http(stack, args.clients, args.requests, args.warmup, args.text_chars, args.quiet_wait)
    say(
        f"{args.clients} clients done: p50 {many['p50_ms']:.2f} ms, "
        f"{many['requests_per_s']:.0f} req/s, {many['errors']} errors"
    )
    profile = None
    if args.profile:
        say(f"profiling {args.profile_seconds} s under {args.clients}-client load with py-spy")
        profile = profile_under_load(stack, args.clients, args.profile_seconds, args.text_chars, args.database)
    return inproc, (one, errors_one), (many, errors_many), profile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per case (default 2000)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients for case (c) (default 16)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up requests before each HTTP case (default 50)")
    parser.add_argument("--text-chars", type=int, default=64, help="length of each echoed text (default 64)")
    parser.add_argument(
        "--profile", action="store_true", help="afterwards, py-spy the web and worker processes under load"
    )
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each HTTP case, wait up to this many seconds for a shared machine to go quiet (default 60)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp data dir (logs) even on success")
    args = parser.parse_args()
    if args.requests < 1 or args.clients < 1:
        parser.error("--requests and --clients must be positive")

    install_signal_handlers()
    tmp = Path(tempfile.mkdtemp(prefix="dla-bench-"))
    stack = RoundtripStack(args.database, tmp)
    measured, exit_code = run_on_stack(stack, tmp, args.keep_tmp, lambda: measure_all(stack, args))
    if measured is None:
        return exit_code
    inproc, (one, errors_one), (many, errors_many), profile = measured

    cases = [inproc, one, many]
    total_errors = inproc["errors"] + errors_one.count + errors_many.count
    print()
    print(
        f"roundtrip, database={args.database}, "
        f"redis={'embedded (unix socket)' if stack.embedded_redis else 'REDIS_URL'}, "
        f"gunicorn gthread {WEB_WORKERS}x{WEB_THREADS}, 1 cpu worker, echo (delay 0), {args.text_chars}-char texts, "
        f"{os.cpu_count()} CPUs"
    )
    print()
    print_cases(cases, inproc)
    print_cpu(cases)
    print_stages(cases)
    print()
    aim_lines = aims(one, many, args.clients)
    for line in aim_lines:
        print(line)
    if profile:
        print_profile(profile)

    result = {
        "benchmark": "roundtrip",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "database": args.database,
            "database_url": redact(stack.database_url) if stack.database_url else "sqlite (temp data dir)",
            "postgres_server_version": stack.postgres_server_version or None,
            "redis": "embedded (unix socket)" if stack.embedded_redis else redact(stack.redis_url),
            "redis_server_version": stack.redis_server_version,
            "web": f"gunicorn gthread, {WEB_WORKERS} workers x {WEB_THREADS} threads, access log on",
            "worker": "manage.py runworker cpu (prefork, concurrency 1, loglevel INFO)",
            "requests_per_case": args.requests,
            "clients": args.clients,
            "warmup": args.warmup,
            "text_chars": args.text_chars,
            "toml": stack.config_text,
        },
        "aims": {
            "p50_ms_1_client_max": AIM_P50_MS_1_CLIENT,
            "requests_per_s_16_clients_min": AIM_RPS_16_CLIENTS,
            "statements": aim_lines,
        },
        "cases": cases,
        "errors_total": total_errors,
        "profile": profile,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"roundtrip-{args.database}.json"
    out.write_text(json.dumps(no_nan(result), indent=2) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")

    if total_errors:
        print("\n" + "!" * 72)
        print(f"!!! {total_errors} REQUEST ERRORS: this run's numbers are not valid")
        for case in (one, many):
            if case.get("error_kinds"):
                print(f"!!!   [{case['case']}] by kind (warm-up included): {case['error_kinds']}")
            for sample in case.get("error_samples", [])[:3]:
                print(f"!!!   [{case['case']}] {sample}")
        print("!" * 72)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
