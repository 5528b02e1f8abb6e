"""The one report writer of the benchmarks: numbers in, tables and JSON out.

A benchmark measures (with `loadgen`, `cpu`, `stack`), builds plain dicts (one per case)
and rows of strings, and hands them here: latency percentiles and spreads, case
summaries of a load run, ratios and number formats, the printed tables, the machine
facts, and the result file under `bench/results/`. Standard library only; progress
lines (`say`) go to stderr so that stdout stays the report.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_VERSIONED = ("Django", "djangorestframework", "gunicorn", "celery", "kombu", "redis", "psycopg", "requests")
NAN = float("nan")


def say(message: str) -> None:
    """Progress on stderr, tagged with the script's name, so stdout stays the report."""
    print(f"[{Path(sys.argv[0]).stem}] {message}", file=sys.stderr, flush=True)


def say_case(case: dict) -> None:
    """One progress line for a finished load case."""
    say(
        f"{case['case']}: p50 {fmt(case['p50_ms'])} ms, p99 {fmt(case['p99_ms'])} ms, "
        f"{fmt(case['requests_per_s'], 0)} req/s, {case['errors']} errors"
    )


# ---------------------------------------------------------------- numbers


def rounded(value: float, digits: int = 6) -> float:
    """`digits` significant digits: short JSON, and sub-microsecond timings survive."""
    if value != value or value in (math.inf, -math.inf) or value == 0:
        return value
    return float(f"{value:.{digits}g}")


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest rank."""
    if not sorted_values:
        return NAN
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


def latency_summary(values_s: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in ms of latencies given in seconds (NaN when there are none)."""
    ms = sorted(v * 1000 for v in values_s)
    if not ms:
        return {key: NAN for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")}
    return {
        "p50_ms": rounded(percentile(ms, 50)),
        "p90_ms": rounded(percentile(ms, 90)),
        "p99_ms": rounded(percentile(ms, 99)),
        "max_ms": rounded(ms[-1]),
        "mean_ms": rounded(sum(ms) / len(ms)),
    }


STATS: dict[str, Callable[[list[float]], float]] = {
    "p50": lambda v: percentile(v, 50),
    "p90": lambda v: percentile(v, 90),
    "p99": lambda v: percentile(v, 99),
    "min": lambda v: v[0],
    "max": lambda v: v[-1],
    "mean": lambda v: sum(v) / len(v),
}


def spread(values: Iterable[float | None], scale: float = 1.0, stats: Sequence[str] = ("p50", "min", "max")) -> dict:
    """{"n", and each of `stats`} of the values times `scale` (NaN and None left out),
    rounded to 3 decimals; {"n": 0} when there are none."""
    kept = sorted(v * scale for v in values if v is not None and v == v)
    if not kept:
        return {"n": 0}
    return {"n": len(kept), **{name: round(STATS[name](kept), 3) for name in stats}}


def case_summary(name: str, outcome: Any, warm: Any = None) -> dict:
    """What a load run (a `loadgen.Outcome`) gave, as the case dict every benchmark
    writes: counts, latency percentiles, req/s, errors by kind and the first samples;
    the warm-up's counts when there was one; `first_chunk` percentiles when streamed."""
    ok = len(outcome.timings)
    case: dict[str, Any] = {"case": name, "requests": outcome.attempted, "ok": ok, "errors": outcome.error_count}
    if warm is not None:
        case["warmup_requests"] = warm.attempted
        case["warmup_errors"] = warm.error_count
    kinds, samples = outcome.errors, outcome.error_samples
    if warm is not None:
        kinds, samples = warm.errors + outcome.errors, warm.error_samples + outcome.error_samples
    case["error_kinds"] = dict(kinds)
    case["error_samples"] = samples[:10]
    case.update(latency_summary(t.total_s for t in outcome.timings))
    case["wall_s"] = rounded(outcome.wall_s)
    case["requests_per_s"] = rounded(ok / outcome.wall_s) if outcome.wall_s > 0 and ok else NAN
    if outcome.stream:
        case["first_chunk"] = latency_summary(t.first_chunk_s for t in outcome.timings if t.first_chunk_s is not None)
    return case


# ---------------------------------------------------------------- formats


def fmt(value: float | None, digits: int = 2) -> str:
    """A number with thousands separators, or "-" for none/NaN."""
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def fmt_ms(value: float | None) -> str:
    """Milliseconds; tiny ones (in-process calls) in scientific notation."""
    if value is None or value != value:
        return "-"
    return f"{value:.2e}" if value < 0.01 else f"{value:.2f}"


def fmt_ratio(numerator: float | None, denominator: float | None, digits: int = 2) -> str:
    """numerator / denominator as "1.23x", or "-" when either is missing."""
    if not denominator or numerator is None or numerator != numerator or denominator != denominator:
        return "-"
    return f"{numerator / denominator:,.{digits}f}x"


def fmt_share(share: float | None) -> str:
    return "-" if share is None or share != share else f"{100 * share:.0f}%"


# ---------------------------------------------------------------- tables


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns as wide as their widest cell; the first left-aligned, the others right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    print(line(header))
    print("-" * len(line(header)))
    for row in rows:
        print(line(row))


def print_columns(columns: Sequence[tuple[str, Callable[[dict], str]]], items: Iterable[dict]) -> None:
    """A table of dicts: each column a header and how to render one dict's cell."""
    print_table([header for header, _cell in columns], [[cell(item) for _header, cell in columns] for item in items])


def print_cpu(cases: Sequence[dict], with_sys: bool = True, min_ms: float = 0.0) -> None:
    """CPU ms per request per process group of each case (from `cpu.CpuMeter.report`)."""
    if with_sys:
        print(f"\nCPU per request (ms, from /proc; the machine has {os.cpu_count()} CPUs):")
    else:
        print(f"\nCPU ms per request by process (from /proc; {os.cpu_count()} CPUs shared by everything here):")
    for case in cases:
        cpu = case.get("cpu_ms_per_request")
        if not cpu:
            continue
        sys_ms = case.get("cpu_sys_ms_per_request", {}) if with_sys else {}
        parts = ", ".join(
            f"{k} {v:.2f}" + (f" (sys {sys_ms[k]:.2f})" if k in sys_ms else "") for k, v in cpu.items() if v >= min_ms
        )
        busy = f"machine busy {fmt_share(case['machine_cpu_busy_share'])}"
        others = f"(other processes {fmt_share(case['other_processes_cpu_share'])})"
        if not with_sys:
            print(f"  {case['case']}: {parts}; {busy} {others}")
            continue
        load = "loadavg {} -> {}".format(*case["loadavg_1m_before_after"])
        print(f"  {case['case']}: {parts}; total {sum(cpu.values()):.2f}; {busy} {others}; {load}")


def print_request_errors(total: int, cases: Sequence[dict], with_kinds: bool = False) -> None:
    """The loud banner of a run whose requests failed: its numbers are not valid."""
    print("\n" + "!" * 72)
    print(f"!!! {total} REQUEST ERRORS: this run's numbers are not valid")
    for case in cases:
        if with_kinds and case.get("error_kinds"):
            print(f"!!!   [{case['case']}] by kind (warm-up included): {case['error_kinds']}")
        for sample in case.get("error_samples", [])[:3]:
            print(f"!!!   [{case['case']}] {sample}")
    print("!" * 72)


# ---------------------------------------------------------------- result files


def machine_info(dists: Iterable[str] = DEFAULT_VERSIONED) -> dict:
    """CPU, Python, platform, the versions of `dists` and the git commit measured."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
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


def result_head(benchmark: str, dists: Iterable[str] = DEFAULT_VERSIONED) -> dict:
    """The first keys of every result file: which benchmark, when, on what."""
    return {
        "benchmark": benchmark,
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(dists),
    }


def no_nan(value: Any) -> Any:
    """NaN (a case with no successful request) as null, so the file is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [no_nan(v) for v in value]
    return value


def write_result(result: dict, path: Path) -> Path:
    """Write `result` as strict JSON to `path` (usually `RESULTS_DIR / name`) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(no_nan(result), indent=2, default=str) + "\n")
    shown = path.resolve()
    print(f"\nwrote {shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else path}")
    return path
