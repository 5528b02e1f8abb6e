"""SQLite writers queued in the kernel vs in SQLite's busy handler (issue 13).

Each call does what the hot path writes: one transaction that charges a key and
inserts a job (`BEGIN IMMEDIATE`, `UPDATE` the key row, `INSERT` the job, `COMMIT`),
then one that ends it (`UPDATE` the job, `UPDATE` the key). `--processes` (2, as the web
tier's workers) x `--threads` (16) writers run calls as fast as they can on one SQLite
file in WAL mode with the project's pragmas, through Django's connection, with the
stock backend (`django.db.backends.sqlite3`) and with ours (`djangollmapi.sqlite`:
a thread lock and `flock` in front of every write), in `--rounds` (4) alternating rounds
of `--calls` (300) calls per thread, one run. Prints p50 / p99 / max of a call and
calls/s per backend and their ratios; writes `bench/results/sqlite_writers.json`.

    .venv/bin/python bench/sqlite_writers.py [--processes 2] [--threads 16] [--calls 300] [--rounds 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

from report import RESULTS_DIR, ROOT, fmt, latency_summary, print_table, result_head, say, write_result

BACKENDS = {
    "stock": "django.db.backends.sqlite3",
    "ours": "djangollmapi.sqlite",
    "ours, slow polls": "djangollmapi.sqlite",
}
# The flock polls (first pause, longest) "ours, slow polls" runs with: the ones
# djangollmapi.sqlite had before (0.5-2 ms), against its FLOCK_PAUSE_S now.
SLOW_POLLS_S = (0.0005, 0.002)
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS key (id INTEGER PRIMARY KEY, calls_used INTEGER, tokens_used INTEGER)",
    "CREATE TABLE IF NOT EXISTS job (id INTEGER PRIMARY KEY AUTOINCREMENT, key_id INTEGER, status TEXT,"
    " input TEXT, created REAL, finished REAL)",
    "INSERT OR IGNORE INTO key VALUES (1, 0, 0)",
]


def configure(engine: str, path: Path) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import django
    from django.conf import settings

    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": engine,
                "NAME": str(path),
                # As djangollmapi.settings has them.
                "OPTIONS": {
                    "timeout": 20,
                    "transaction_mode": "IMMEDIATE",
                    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                },
                "CONN_MAX_AGE": None,
            }
        },
        INSTALLED_APPS=[],
        USE_TZ=True,
    )
    django.setup()


def one_call(n: int) -> None:
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE key SET calls_used = calls_used + 1, tokens_used = tokens_used + 8 WHERE id = 1")
        cursor.execute(
            "INSERT INTO job (key_id, status, input, created) VALUES (1, 'queued', %s, %s)",
            [f"call {n}", time.time()],
        )
        job_id = cursor.lastrowid
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("UPDATE job SET status = 'succeeded', finished = %s WHERE id = %s", [time.time(), job_id])
        cursor.execute("UPDATE key SET tokens_used = tokens_used - 2 WHERE id = 1")


def spin(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def writer_process(backend: str, path: str, threads: int, calls: int, think_s: float, start_at: float, out) -> None:
    configure(BACKENDS[backend], Path(path))
    from django.db import connection

    if backend == "ours, slow polls":
        from djangollmapi.sqlite import base

        base.FLOCK_PAUSE_S = SLOW_POLLS_S

    latencies: list[float] = []
    lock = threading.Lock()

    def writer(index: int) -> None:
        mine = []
        while time.time() < start_at:
            time.sleep(0.001)
        for n in range(calls):
            spin(think_s)  # the request's own Python work, holding the GIL as views do
            began = time.perf_counter()
            one_call(index * 1_000_000 + n)
            mine.append(time.perf_counter() - began)
        connection.close()
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    out.put((latencies, time.time()))


def measure(backend: str, path: Path, args: argparse.Namespace) -> dict:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 2.0  # every process imported Django and is waiting
    workers = [
        context.Process(
            target=writer_process,
            args=(backend, str(path), args.threads, args.calls, args.think_ms / 1000, start_at, out),
        )
        for _ in range(args.processes)
    ]
    for worker in workers:
        worker.start()
    results = [out.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join(30)
    latencies = [value for found, _ in results for value in found]
    wall_s = max(ended for _, ended in results) - start_at
    return {"backend": backend, "calls": len(latencies), "wall_s": wall_s, "latencies": latencies}


def prepare(path: Path) -> None:
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        for statement in SCHEMA:
            db.execute(statement)


def summarise(runs: list[dict]) -> dict[str, dict]:
    summary = {}
    for backend in BACKENDS:
        mine = [run for run in runs if run["backend"] == backend]
        latencies = [value for run in mine for value in run["latencies"]]
        calls, wall = sum(run["calls"] for run in mine), sum(run["wall_s"] for run in mine)
        summary[backend] = {
            **latency_summary(latencies),
            "calls": calls,
            "calls_per_s": calls / wall,
            "calls_per_s_by_round": [round(run["calls"] / run["wall_s"], 1) for run in mine],
        }
    return summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--calls", type=int, default=300, help="calls per thread per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--think-ms", type=float, default=3.0, help="CPU work (GIL held) before each call")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="dla-bench-sqlite-") as tmp:
        for round_ in range(args.rounds):
            order = list(BACKENDS) if round_ % 2 == 0 else list(reversed(BACKENDS))
            for backend in order:
                path = Path(tmp) / f"{backend.replace(', ', '-').replace(' ', '-')}-{round_}.sqlite3"
                prepare(path)
                say(f"round {round_}: {backend}, {args.processes} x {args.threads} writers")
                runs.append(measure(backend, path, args))
    summary = summarise(runs)
    print(
        f"\nSQLite writers: {args.processes} processes x {args.threads} threads, two transactions a call,"
        f" {args.rounds} alternating rounds of {args.calls} calls a thread, {args.think_ms:g} ms of CPU"
        " before each"
    )
    rows = [
        [name, f"{s['calls']:,}", fmt(s["p50_ms"]), fmt(s["p99_ms"]), fmt(s["max_ms"]), f"{s['calls_per_s']:,.0f}"]
        for name, s in summary.items()
    ]
    ours = summary["ours"]
    for label, other in (("ours / stock", summary["stock"]), ("ours / ours, slow polls", summary["ours, slow polls"])):
        rows.append(
            [
                label,
                "",
                fmt(ours["p50_ms"] / other["p50_ms"]) + "x",
                fmt(ours["p99_ms"] / other["p99_ms"]) + "x",
                fmt(ours["max_ms"] / other["max_ms"]) + "x",
                fmt(ours["calls_per_s"] / other["calls_per_s"]) + "x",
            ]
        )
    print_table(["backend", "calls", "p50 ms", "p99 ms", "max ms", "calls/s"], rows)
    result = {**result_head("sqlite_writers", ("Django",)), "args": vars(args), "summary": summary}
    write_result(result, RESULTS_DIR / "sqlite_writers.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
