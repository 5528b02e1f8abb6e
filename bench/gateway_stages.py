"""Where one upstream call's time goes inside our gateway: run by gateway_overhead.py in
a child process with the benchmark stack's environment (config, data dir, database).

It sends the same chat completion through Django in-process (the test client: every
middleware, DRF, the view, the pooled httpx client, the real database and the real fake
provider; no gunicorn, no client socket), one at a time, with timers wrapped around
the stages `gateway.proxy.forward` calls and a database execute wrapper counting
statements. Wrapping looks functions up by module attribute at call time, which is how
proxy.py calls them, so the code measured is the code that serves requests.

Prints one JSON object: per-stage p50 / mean ms, statements per request, SQL time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangollmapi.settings")

import django  # noqa: E402

django.setup()

from django.db import connection, connections  # noqa: E402
from django.test import Client  # noqa: E402

from djangollmapi import middleware  # noqa: E402
from gateway import proxy, upstream  # noqa: E402
from llmjobs import services  # noqa: E402

# (label, module, attribute): the stages of gateway.proxy.forward, in call order.
STAGES = (
    ("parse key", proxy, "presented_key"),
    ("parse + validate body", proxy, "parse_with_key_errors_first"),
    ("key check + reserve + Job INSERT (1 transaction)", services, "start_upstream_job"),
    ("release DB connection", services, "release_db_connection"),
    ("httpx: send + provider answers headers", upstream, "open_response"),
    ("httpx: read + JSON-decode body", upstream, "read_json"),
    ("Job UPDATE + settle tokens (1 transaction)", services, "finish_job"),
    ("request log line", middleware.RequestLogMiddleware, "write"),
)


class Recorder:
    """Seconds spent in each wrapped stage, per request, and SQL statements."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.sql_count = 0
        self.sql_s = 0.0
        self.commits = 0
        self.commit_s = 0.0

    def wrap(self, label: str, owner: Any, name: str) -> None:
        original: Callable = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[label] += time.perf_counter() - t0

        setattr(owner, name, timed)

    def sql(self, execute: Callable, sql: str, params: Any, many: bool, context: dict) -> Any:
        t0 = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.sql_s += time.perf_counter() - t0
            self.sql_count += 1

    def wrap_commit(self) -> None:
        """COMMIT does not pass the execute wrapper: time the backend's _commit itself."""
        backend = type(connections["default"])
        original = backend._commit

        def timed(wrapper: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(wrapper)
            finally:
                self.commit_s += time.perf_counter() - t0
                self.commits += 1

        backend._commit = timed

    def take(self) -> dict[str, Any]:
        taken = {
            "stages": dict(self.current),
            "sql_count": self.sql_count,
            "sql_s": self.sql_s,
            "commits": self.commits,
            "commit_s": self.commit_s,
        }
        self.current.clear()
        self.sql_count, self.sql_s, self.commits, self.commit_s = 0, 0.0, 0, 0.0
        return taken


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values_s)
    return {"p50": round(ms[len(ms) // 2], 3), "mean": round(sum(ms) / len(ms), 3)} if ms else {}


def time_floor(client: Client, path: str, headers: dict[str, str], n: int, warmup: int) -> dict[str, float]:
    """Django's part of the floor: a GET nobody routes, answered with our JSON 404."""
    totals = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        response = client.get(path, **headers)
        if response.status_code != 404:
            raise SystemExit(f"{path}: HTTP {response.status_code}, expected 404")
        if i >= warmup:
            totals.append(time.perf_counter() - t0)
    return summary_ms(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--body", required=True, help="the JSON body to POST")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--floor-path", default="", help="also time GET of this unrouted path (the JSON 404)")
    args = parser.parse_args()

    recorder = Recorder()
    for label, owner, name in STAGES:
        recorder.wrap(label, owner, name)
    recorder.wrap_commit()
    client = Client(HTTP_HOST="127.0.0.1")
    headers = {"HTTP_AUTHORIZATION": f"Bearer {args.key}"}
    totals: list[float] = []
    per_stage: dict[str, list[float]] = defaultdict(list)
    sql_counts: list[int] = []
    sql_times: list[float] = []
    commit_counts: list[int] = []
    commit_times: list[float] = []
    with connection.execute_wrapper(recorder.sql):
        for i in range(args.warmup + args.requests):
            t0 = time.perf_counter()
            response = client.post("/v1/chat/completions", data=args.body, content_type="application/json", **headers)
            total = time.perf_counter() - t0
            taken = recorder.take()
            if response.status_code != 200:
                raise SystemExit(f"HTTP {response.status_code}: {response.content[:300]!r}")
            if i < args.warmup:
                continue
            totals.append(total)
            sql_counts.append(taken["sql_count"])
            sql_times.append(taken["sql_s"])
            commit_counts.append(taken["commits"])
            commit_times.append(taken["commit_s"])
            for label, _owner, _name in STAGES:
                per_stage[label].append(taken["stages"].get(label, 0.0))
    floor = time_floor(client, args.floor_path, headers, args.requests, args.warmup) if args.floor_path else {}
    covered = [sum(per_stage[label][i] for label in per_stage) for i in range(len(totals))]
    result = {
        "requests": len(totals),
        "in_process_total_ms": summary_ms(totals),
        "stages_ms": {label: summary_ms(per_stage[label]) for label, _owner, _name in STAGES},
        "rest_ms": summary_ms([t - c for t, c in zip(totals, covered, strict=True)]),
        "rest_is": "Django + DRF request/response handling, middleware, routing, body parsing, JsonResponse",
        "sql_statements_per_request": sorted(set(sql_counts)),
        "sql_ms": summary_ms(sql_times),
        "sql_is": "statements through Django's execute wrapper (BEGIN included), COMMIT not",
        "commits_per_request": sorted(set(commit_counts)),
        "commit_ms": summary_ms(commit_times),
        "database_vendor": connection.vendor,
        "floor_in_process_ms": floor,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
