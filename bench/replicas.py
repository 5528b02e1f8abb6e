"""Replicas of one model: requests/s on 1, 2 and 4 devices against n x one device's.

`Echo` with a fixed `delay_ms` (100 ms: the job's time dominates everything else) is
deployed three times in one config, on one device (`echo-x1`, cpu:11), on two
(`echo-x2`, `devices = ["cpu:12", "cpu:13"]`) and on four (`echo-x4`, cpu:14..17),
each device with its own `manage.py runworker`, as on a host with that many GPUs.
Starts its own stack (`stack.Stack`: embedded Redis unless REDIS_URL is set, SQLite or
PostgreSQL, gunicorn gthread 2 x 32 as `manage.py serve` does), then in ONE run, per
deployment: `--warmup` calls, then `--requests` `POST /api/` calls from `--clients`
(32) keep-alive clients (`loadgen`), each answer checked (200, the text echoed).

Per case: req/s, p50/p90/p99, the ratio to n x the one-device case's req/s (aim:
>= 0.9, issue 15), how the jobs spread over the devices (from the job rows' queue),
and the machine's CPU busy share and what other processes took of it (a shared
machine contaminates the numbers). Prints a table, writes
`bench/results/replicas.json`. Every process it starts is stopped on exit, error or
Ctrl-C.

    .venv/bin/python bench/replicas.py [--requests N] [--clients 32] [--delay-ms 100]
        [--database sqlite|postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import loadgen
from cpu import CpuMeter, wait_for_quiet
from internals import JOB_TABLE, KEY_TABLE, QUEUE_PREFIX, key_prefix
from loadgen import CallError, Load, Pool, Reply
from report import (
    RESULTS_DIR,
    case_summary,
    fmt,
    fmt_ms,
    fmt_share,
    print_columns,
    print_request_errors,
    result_head,
    say,
    say_case,
    write_result,
)
from stack import Stack, install_signal_handlers, run_on_stack, server_toml

ALGORITHM = "algorithms.echo:Echo"
REPLICAS = {1: ["cpu:11"], 2: ["cpu:12", "cpu:13"], 4: ["cpu:14", "cpu:15", "cpu:16", "cpu:17"]}
WEB_WORKERS = 2
WEB_THREADS = 32
AIM_RATIO = 0.9


def model_for(n: int) -> str:
    return f"echo-x{n}"


def config_toml(tmp: Path, port: int, delay_ms: float) -> str:
    """One deployment per replica count: `device` for one, `devices` for several."""
    text = server_toml("replicas.py", tmp, port, web_workers=WEB_WORKERS, web_threads=WEB_THREADS)
    text += "\n[worker]\npreload = true\n"
    for n, devices in REPLICAS.items():
        placement = f'device = "{devices[0]}"' if n == 1 else "devices = [" + ", ".join(f'"{d}"' for d in devices) + "]"
        text += (
            f'\n[[deployments]]\nname = "{model_for(n)}"\nalgorithm = "{ALGORITHM}"\n{placement}\n'
            f"options = {{ delay_ms = {delay_ms:g} }}\n"
        )
    return text


def text_for(tag: str, i: int) -> str:
    return f"replicas {tag} #{i}"


def post_load(stack: Stack, model: str, tag: str) -> Load:
    """`POST /api/` with call i's own text, checked to come back echoed by `model`."""

    def check(i: int, reply: Reply) -> None:
        try:
            answer = json.loads(reply.body)
        except ValueError:
            raise CallError("bad JSON", reply.body.decode("utf-8", "replace")) from None
        if not isinstance(answer, dict) or answer.get("message") != text_for(tag, i) or answer.get("model") != model:
            raise CallError("wrong body", json.dumps(answer)[:300])

    headers = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
    body = lambda i: json.dumps({"text": text_for(tag, i), "model": model}).encode()  # noqa: E731
    return Load("/api/", headers, body, check=check)


def spread(stack: Stack, model: str, tag: str) -> dict[str, int]:
    """How many of the case's jobs each device's queue ran (from the job rows)."""
    rows = stack.query(
        f"SELECT j.queue, COUNT(*) FROM {JOB_TABLE} j JOIN {KEY_TABLE} k ON k.id = j.api_key_id "
        f"WHERE k.prefix = {{p}} AND j.model = {{p}} AND j.input_text LIKE {{p}} GROUP BY j.queue",
        [key_prefix(stack.api_key), model, f"replicas {tag} #%"],
    )
    return {queue.removeprefix(QUEUE_PREFIX).replace("-", ":"): count for queue, count in sorted(rows)}


def measure(stack: Stack, n: int, args: argparse.Namespace) -> dict:
    """Warm up, then `args.requests` calls to the n-replica deployment, CPU metered."""
    model, tag = model_for(n), f"x{n}"
    with Pool(stack.port, args.clients) as pool:
        idle_busy = wait_for_quiet(args.quiet_wait)
        warm = pool.warm_up(post_load(stack, model, f"warm{n}"), args.warmup)
        with CpuMeter(stack) as meter:
            outcome = pool.run(post_load(stack, model, tag), args.requests)
    case = case_summary(f"{n} replica{'s' if n > 1 else ''} ({', '.join(REPLICAS[n])})", outcome, warm)
    case.update(replicas=n, clients=args.clients, machine_busy_share_before=round(idle_busy, 3))
    report = meter.report(len(outcome.timings))
    case["machine_cpu_busy_share"] = report["machine_cpu_busy_share"]
    case["other_processes_cpu_share"] = report["other_processes_cpu_share"]
    try:
        case["jobs_per_device"] = spread(stack, model, tag)
    except Exception as exc:  # diagnostics only; never fail the run for them
        case["jobs_per_device"] = {"error": f"{type(exc).__name__}: {exc}"}
    return case


def measure_all(stack: Stack, args: argparse.Namespace) -> list[dict]:
    say(f"ready; {args.requests} calls per case from {args.clients} clients, Echo delay {args.delay_ms:g} ms")
    cases = []
    for n in REPLICAS:
        cases.append(measure(stack, n, args))
        say_case(cases[-1])
    one = cases[0]["requests_per_s"]
    for case in cases:
        case["ratio_to_n_x_one"] = round(case["requests_per_s"] / (case["replicas"] * one), 3) if one else None
    return cases


def print_cases(cases: list[dict]) -> None:
    print_columns(
        [
            ("case", lambda c: c["case"]),
            ("ok", lambda c: str(c["ok"])),
            ("err", lambda c: str(c["errors"])),
            ("p50 ms", lambda c: fmt_ms(c["p50_ms"])),
            ("p90 ms", lambda c: fmt_ms(c["p90_ms"])),
            ("p99 ms", lambda c: fmt_ms(c["p99_ms"])),
            ("req/s", lambda c: fmt(c["requests_per_s"], 1)),
            ("/ (n x one)", lambda c: fmt(c["ratio_to_n_x_one"], 2)),
            ("jobs per device", lambda c: " ".join(f"{d}:{k}" for d, k in c["jobs_per_device"].items())),
            ("busy", lambda c: fmt_share(c["machine_cpu_busy_share"])),
            ("others", lambda c: fmt_share(c["other_processes_cpu_share"])),
        ],
        cases,
    )


def aims(cases: list[dict]) -> list[str]:
    lines = []
    for case in cases[1:]:
        ratio = case["ratio_to_n_x_one"]
        met = ratio is not None and ratio >= AIM_RATIO
        lines.append(
            f"aim: {case['replicas']} replicas >= {AIM_RATIO:g} x {case['replicas']} x one's req/s"
            f"   measured {fmt(ratio, 2)} -> " + ("met" if met else "NOT met")
        )
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=640, help="measured calls per case (default 640)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--warmup", type=int, default=64, help="warm-up calls before each case (default 64)")
    parser.add_argument("--delay-ms", type=float, default=100.0, help="Echo's delay per job (default 100)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30,
        help="before each case, wait up to this many seconds for a shared machine to go quiet (default 30)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp data dir (logs) even on success")
    args = parser.parse_args()
    if args.requests < 1 or args.clients < 1 or args.delay_ms <= 0:
        parser.error("--requests, --clients and --delay-ms must be positive")
    return args


def main() -> int:
    args = parse_args()
    install_signal_handlers()
    tmp = Path(tempfile.mkdtemp(prefix="dla-bench-replicas-"))
    devices = [device for group in REPLICAS.values() for device in group]
    stack = Stack(
        args.database, tmp, lambda t, port: config_toml(t, port, args.delay_ms), devices, WEB_WORKERS, WEB_THREADS
    )
    cases, exit_code = run_on_stack(stack, tmp, args.keep_tmp, lambda: measure_all(stack, args))
    if cases is None:
        return exit_code
    print(
        f"\nreplicas, database={args.database}, "
        f"redis={'embedded (unix socket)' if stack.embedded_redis else 'REDIS_URL'}, "
        f"gunicorn gthread {WEB_WORKERS}x{WEB_THREADS}, Echo delay {args.delay_ms:g} ms, "
        f"{args.clients} clients, {args.requests} calls per case, {os.cpu_count()} CPUs\n"
    )
    print_cases(cases)
    aim_lines = aims(cases)
    print("\n" + "\n".join(aim_lines))
    result = result_head("replicas") | {
        "config": {
            **stack.describe(),
            "web": f"gunicorn gthread, {WEB_WORKERS} workers x {WEB_THREADS} threads",
            "workers": {model_for(n): [f"manage.py runworker {d}" for d in group] for n, group in REPLICAS.items()},
            "load_generator": loadgen.DESCRIPTION,
            "requests_per_case": args.requests,
            "clients": args.clients,
            "warmup": args.warmup,
            "delay_ms": args.delay_ms,
            "toml": stack.config_text,
        },
        "aims": {"ratio_to_n_x_one_min": AIM_RATIO, "statements": aim_lines},
        "cases": cases,
        "errors_total": sum(c["errors"] + c.get("warmup_errors", 0) for c in cases),
    }
    write_result(result, RESULTS_DIR / "replicas.json")
    if result["errors_total"]:
        print_request_errors(result["errors_total"], cases, with_kinds=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
