"""Where one upstream call's time goes inside our gateway: run by gateway_overhead.py in
a child process with the benchmark stack's environment (config, data dir, database).

Two loops, interleaved request by request so both see the same machine:

- the whole call: the same chat completion through Django in-process (the test
  client: every middleware, DRF, the view, the provider's pooled connections, the real database
  and the real fake provider; no gunicorn, no client socket), with statements and
  COMMITs counted;
- its stages: the same call made through the seams the view is built of, each one
  timed: the authentication class's `caller_for`, `route_model`, the typed body,
  `upstreamjobs.open_upstream` (admission + Job INSERT), the provider (`upstream`), and
  `upstreamjobs.finish_upstream` (with `[server] write_behind`, its journal line: the
  database write is the journal writer's thread, off the call's path, and its CPU is
  in the process's CPU the benchmark reads from /proc), then the request log line.

"rest" is the whole call's p50 minus the stages' p50s: Django, DRF, the middleware,
JSON. Prints one JSON object: per-stage p50 / mean ms, statements per request, SQL time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangollmapi.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from django.http import JsonResponse  # noqa: E402
from django.test import Client, RequestFactory  # noqa: E402

from apikeys.authentication import caller_for  # noqa: E402
from djangollmapi.middleware import RequestLogMiddleware  # noqa: E402
from djangollmapi.routes import route_model  # noqa: E402
from gateway import proxy, upstream  # noqa: E402
from gateway.protocol import forwarded, requests  # noqa: E402
from llmjobs import upstreamjobs  # noqa: E402

PATH = "/v1/chat/completions"
STAGES = (
    "authenticate: parse the Authorization header (caller_for)",
    "route_model + typed body",
    "admission: key check + reserve + Job INSERT (1 statement on PostgreSQL)",
    "provider: send + provider answers headers (urllib3)",
    "provider: read + JSON-decode body",
    "finish: the journal's line, rate limits, metrics (the write is behind)",
    "request log line",
)


class Counter:
    """SQL statements (through Django's execute wrapper) and COMMITs of one request."""

    def __init__(self) -> None:
        self.sql_count, self.sql_s, self.commits, self.commit_s = 0, 0.0, 0, 0.0

    def sql(self, execute: Callable, sql: str, params: Any, many: bool, context: dict) -> Any:
        t0 = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.sql_s += time.perf_counter() - t0
            self.sql_count += 1

    @contextmanager
    def commits_counted(self):
        """COMMIT does not pass the execute wrapper: time Django's connection.commit."""
        original = connection.commit

        def timed() -> None:
            t0 = time.perf_counter()
            try:
                original()
            finally:
                self.commit_s += time.perf_counter() - t0
                self.commits += 1

        connection.commit = timed
        try:
            yield
        finally:
            del connection.commit

    def take(self) -> dict[str, float]:
        taken = {"sql_count": self.sql_count, "sql_s": self.sql_s, "commits": self.commits, "commit_s": self.commit_s}
        self.__init__()
        return taken


def staged_call(factory: RequestFactory, body: str, key: str) -> dict[str, float]:
    """One call made through the seams, in the view's order; seconds per stage (the
    request object and the response the log line reads are made outside the timing)."""
    reply = JsonResponse({"model": "logged"})
    request = factory.post(PATH, data=body, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {key}")
    marks = [time.perf_counter()]
    caller = caller_for(request)
    marks.append(time.perf_counter())
    data = json.loads(body)
    route = route_model(requests.model_name(data))
    call = forwarded.parse_upstream(
        "chat", data, route.upstream.reserve_tokens, settings.LLM_CONFIG.server.max_input_chars
    )
    marks.append(time.perf_counter())
    job = upstreamjobs.open_upstream(caller.presented, route, call)
    marks.append(time.perf_counter())
    response = upstream.open_response(route, call.kind, call.body_for(route.model.upstream_name))
    marks.append(time.perf_counter())
    answer = upstream.read_json(route, response)
    marks.append(time.perf_counter())
    upstreamjobs.finish_upstream(job, route, proxy.answer_text(answer), upstream.usage_numbers(answer))
    marks.append(time.perf_counter())
    RequestLogMiddleware(lambda r: None).write(request, reply, marks[0])
    marks.append(time.perf_counter())
    return {label: b - a for label, a, b in zip(STAGES, marks[:-1], marks[1:], strict=True)}


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


def measure(args: argparse.Namespace) -> dict[str, Any]:
    client, factory, counter = Client(HTTP_HOST="127.0.0.1"), RequestFactory(HTTP_HOST="127.0.0.1"), Counter()
    headers = {"HTTP_AUTHORIZATION": f"Bearer {args.key}"}
    totals: list[float] = []
    per_stage: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, list[float]] = defaultdict(list)
    for i in range(args.warmup + args.requests):
        with connection.execute_wrapper(counter.sql), counter.commits_counted():
            t0 = time.perf_counter()
            response = client.post(PATH, data=args.body, content_type="application/json", **headers)
            total = time.perf_counter() - t0
        taken = counter.take()
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code}: {response.content[:300]!r}")
        stages = staged_call(factory, args.body, args.key)
        if i < args.warmup:
            continue
        totals.append(total)
        for name, value in taken.items():
            counts[name].append(value)
        for label in STAGES:
            per_stage[label].append(stages[label])
    stages_ms = {label: summary_ms(per_stage[label]) for label in STAGES}
    rest_p50 = summary_ms(totals)["p50"] - sum(stage["p50"] for stage in stages_ms.values())
    return {
        "requests": len(totals),
        "in_process_total_ms": summary_ms(totals),
        "stages_ms": stages_ms,
        "rest_ms": {"p50": round(rest_p50, 3)},
        "rest_is": "Django + DRF request/response handling, middleware, URL routing, body parsing, JsonResponse",
        "sql_statements_per_request": sorted({int(c) for c in counts["sql_count"]}),
        "sql_ms": summary_ms(counts["sql_s"]),
        "sql_is": "statements through Django's execute wrapper (BEGIN included), COMMIT not",
        "commits_per_request": sorted({int(c) for c in counts["commits"]}),
        "commit_ms": summary_ms(counts["commit_s"]),
        "database_vendor": connection.vendor,
        "floor_in_process_ms": time_floor(client, args.floor_path, headers, args.requests, args.warmup)
        if args.floor_path
        else {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--body", required=True, help="the JSON body to POST")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--floor-path", default="", help="also time GET of this unrouted path (the JSON 404)")
    print(json.dumps(measure(parser.parse_args())))


if __name__ == "__main__":
    main()
