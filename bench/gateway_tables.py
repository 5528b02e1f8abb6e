"""The rows of bench/gateway_overhead.py's tables, handed to `report` to print.

Its case dicts (one per target, concurrency and streaming, see `case_summary`) become
the latency table and the streaming table; the in-process stage timing from
bench/gateway_stages.py becomes the stage table; the py-spy summaries are listed per
gunicorn worker.
"""

from __future__ import annotations

import profiling
from gateway_stack import FLOOR_PATH
from report import fmt, fmt_share, print_columns, print_table

CASE_COLUMNS = [
    ("case", lambda c: c["case"]),
    ("ok", lambda c: str(c["ok"])),
    ("err", lambda c: str(c["errors"])),
    ("p50 ms", lambda c: fmt(c["p50_ms"])),
    ("p90 ms", lambda c: fmt(c["p90_ms"])),
    ("p99 ms", lambda c: fmt(c["p99_ms"])),
    ("req/s", lambda c: fmt(c["requests_per_s"], 0)),
    ("+p50 ms", lambda c: fmt(c.get("added_p50_ms"))),
    ("+p99 ms", lambda c: fmt(c.get("added_p99_ms"))),
    ("hop CPU ms/req", lambda c: fmt(c["hop_cpu_ms_per_request"])),
    ("others", lambda c: fmt_share(c["other_processes_cpu_share"])),
]
STREAM_COLUMNS = [
    ("case", lambda c: c["case"]),
    ("ok", lambda c: str(c["ok"])),
    ("err", lambda c: str(c["errors"])),
    ("first chunk p50", lambda c: fmt(c["first_chunk"]["p50_ms"])),
    ("p99", lambda c: fmt(c["first_chunk"]["p99_ms"])),
    ("+p50", lambda c: fmt(c.get("added_first_chunk_p50_ms"))),
    ("done p50", lambda c: fmt(c["p50_ms"])),
    ("p99", lambda c: fmt(c["p99_ms"])),
]


def print_cases(cases: list[dict]) -> None:
    print_columns(CASE_COLUMNS, [c for c in cases if not c["stream"]])
    print(
        "+p50/+p99: added to the direct call at the same concurrency; hop CPU: the gateway's own processes; "
        "others: machine CPU taken by processes outside this benchmark meanwhile (large = contaminated)"
    )
    streamed = [c for c in cases if c["stream"]]
    if streamed:
        print("\nstreaming (stream: true), 1 client: time to first content chunk and to [DONE]")
        print_columns(STREAM_COLUMNS, streamed)


def print_stages(stages: dict, http_p50_ms: float | None, floor_http_p50_ms: float | None) -> None:
    """The stage table of bench/gateway_stages.py's JSON, next to the HTTP p50s."""
    if "error" in stages:
        print(f"\nour gateway's stages: failed: {stages['error']}")
        return
    total = stages["in_process_total_ms"]
    statements = "/".join(map(str, stages["sql_statements_per_request"]))
    commits = "/".join(map(str, stages["commits_per_request"]))
    print(
        f"\nour gateway's stages, in-process (Django test client, 1 at a time, {stages['requests']} requests, "
        f"{stages['database_vendor']}; {statements} SQL statements per request, "
        f"{fmt(stages['sql_ms'].get('p50'))} ms in them at p50; "
        f"{commits} COMMITs, {fmt(stages['commit_ms'].get('p50'))} ms at p50):"
    )
    rows = [[label, fmt(s.get("p50")), fmt(s.get("mean"))] for label, s in stages["stages_ms"].items()]
    rows.append(["rest: " + stages["rest_is"], fmt(stages["rest_ms"].get("p50")), fmt(stages["rest_ms"].get("mean"))])
    rows.append(["total in-process", fmt(total.get("p50")), fmt(total.get("mean"))])
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
    lists = [("our code, inclusive", "own_code_inclusive", 15), ("top inclusive", "inclusive_top", 25)]
    profiling.print_entries(summary["processes"].items(), 10, lists)
