"""Gateway overhead: the same chat completion sent straight to a provider, through our
upstream gateway, and through LiteLLM's proxy (issue #5).

Measures what our `[[upstreams]]` gateway adds to a provider call (latency, throughput,
CPU), next to what LiteLLM's proxy adds on the same machine, same provider, same load
generator, in ONE run. Starts, in a temporary data dir (`gateway_stack`):

  - `bench/fake_upstream.py`, a minimal OpenAI-compatible provider (stdlib HTTP server,
    fixed answer with usage, SSE when streaming) in its own process;
  - our stack: embedded Redis (or REDIS_URL), SQLite in WAL or PostgreSQL, `migrate`, a
    fresh key from `createapikey`, gunicorn gthread with the config's default shape
    (`web_workers` x `web_threads`, 2 x 32) and one `[[upstreams]]` entry pointing at the
    fake provider; no Celery worker (the web process forwards upstream calls itself);
  - LiteLLM's proxy (`litellm[proxy]`, pinned, in its own venv `bench/.venv-litellm`,
    installed on first use) with its default single uvicorn worker, no database, a
    master key, and the same fake provider as `openai/<model>`.

Then, with `loadgen` for all targets (a thread and a keep-alive `http.client`
connection per client, the same body and checks):

  (a) direct to the fake provider, (b) our gateway, (c) LiteLLM; each at 1 and 32
  concurrent clients, non-streaming, after a warm-up, each case's calls in `--rounds`
  rounds with the targets taking turns (a slow spell of a shared VM then falls on
  every target, not on one, and the ratios hold); then one client streaming
  (time to first content chunk). Also our web stack's floor: `GET /v1/bench-floor`, an
  unrouted path (gunicorn + Django + our middleware + the JSON 404, no gateway work).

Then our gateway's stages, timed in-process by `bench/gateway_stages.py` (a child
process; key check and Job INSERT, the provider call, the finish, logging, the rest of Django),
to say where the added latency goes; if it fails, the run says so and goes on.

Reports p50/p90/p99 latency, req/s, the latency each gateway adds to the direct call,
CPU ms per request per process (from /proc) and our throughput over LiteLLM's at 32
clients, against the issue's aims. Prints a table, writes
`bench/results/gateway_overhead.json` (`gateway_overhead-postgres.json` with
`--database postgres`). With `--profile`, afterwards records py-spy on our gunicorn
workers under the 1- and 32-client loads and prints where their time goes. Every process
it starts is stopped on exit, error or Ctrl-C.

    .venv/bin/python bench/gateway_overhead.py [--requests 2000] [--rounds 4] [--database sqlite|postgres|both]
        [--profile] [--skip-litellm] [--stream-requests 500] [--stage-requests 500] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import loadgen
import profiling
from cpu import CpuMeter, merged_meters, wait_for_quiet
from gateway_stack import (
    FLOOR_PATH,
    LITELLM_INSTALL,
    MAX_TOKENS,
    MODEL,
    PROMPT,
    WEB_THREADS,
    WEB_WORKERS,
    GatewayStack,
    Target,
    litellm_config_yaml,
)
from gateway_tables import print_cases, print_profile, print_stages
from loadgen import Pool
from report import (
    RESULTS_DIR,
    ROOT,
    case_summary,
    print_cpu,
    print_request_errors,
    result_head,
    rounded,
    say,
    say_case,
    write_result,
)
from stack import install_signal_handlers, run_on_stack

CONCURRENCIES = (1, 32)
# Issue #13's aims, each against a yardstick measured in the same run.
AIM_CPU_OVER_FLOOR = 2.0  # our web CPU per call <= 2x the floor's (1 client)
AIM_ADDED_P50_OVER_FLOOR = 3.0  # our added p50 <= 3x the floor's added p50 (1 client)
AIM_RATIO_VS_LITELLM_32_CLIENTS = 8.0  # our req/s >= 8x LiteLLM's (32 clients)
AIM_P99_OVER_P50_32_CLIENTS = 4.0  # our p99 <= 4x our p50 (32 clients)
PROFILE_RATE_HZ = 100  # 200 Hz over 64 threads falls behind on a busy 2-core machine
STAGES_TIMEOUT_S = 600
VERSIONED = ("Django", "djangorestframework", "gunicorn", "urllib3", "redis", "psycopg")
STAGES_KEYS = (
    "requests",
    "in_process_total_ms",
    "stages_ms",
    "rest_ms",
    "rest_is",
    "sql_statements_per_request",
    "sql_ms",
    "sql_is",
    "commits_per_request",
    "commit_ms",
    "database_vendor",
    "floor_in_process_ms",
)


# ---------------------------------------------------------------- measurement


def measure_once(
    stack: GatewayStack, target: Target, clients: int, args: argparse.Namespace, stream: bool, n: int, warmup: int
) -> tuple[loadgen.Outcome, CpuMeter, loadgen.Outcome, float]:
    """One round of a case: a warm-up, then `n` calls from `clients` threads with
    per-process CPU metered; (outcome, meter, warm-up, the machine's busy share before)."""
    load = target.load(stream)
    with Pool(target.port, clients) as pool:
        busy_before = wait_for_quiet(args.quiet_wait)
        warm = pool.warm_up(load, warmup)
        with CpuMeter(stack) as meter:
            outcome = pool.run(load, n)
    return outcome, meter, warm, busy_before


def case_of(target: Target, clients: int, stream: bool, rounds: list[tuple]) -> dict:
    """A case from its rounds (`measure_once`): latencies pooled, CPU summed."""
    outcome = loadgen.merged([run[0] for run in rounds])
    meter = merged_meters([run[1] for run in rounds])
    name = f"{target.label}, {clients} client{'s' if clients > 1 else ''}" + (", stream" if stream else "")
    case = {"target": target.name, "clients": clients, "stream": stream, "rounds": len(rounds)}
    case |= case_summary(name, outcome, loadgen.merged([run[2] for run in rounds]))
    case["machine_busy_share_before"] = round(max(run[3] for run in rounds), 3)
    case.update(meter.report(len(outcome.timings)))
    own = [v for k, v in case["cpu_ms_per_request"].items() if k in target.groups]
    case["hop_cpu_ms_per_request"] = round(sum(own), 3) if target.groups else None
    case["upstream_cpu_ms_per_request"] = case["cpu_ms_per_request"].get("fake upstream")
    return case


def add_overheads(cases: list[dict]) -> None:
    """Each gateway case's added latency over the direct case of the same shape."""
    direct = {(c["clients"], c["stream"]): c for c in cases if c["target"] == "direct"}
    for case in cases:
        base = direct.get((case["clients"], case["stream"]))
        if base is None or case is base:
            continue
        case["added_p50_ms"] = rounded(case["p50_ms"] - base["p50_ms"])
        case["added_p99_ms"] = rounded(case["p99_ms"] - base["p99_ms"])
        if case["stream"]:
            added = case["first_chunk"]["p50_ms"] - base["first_chunk"]["p50_ms"]
            case["added_first_chunk_p50_ms"] = rounded(added)


def run_cases(stack: GatewayStack, args: argparse.Namespace) -> list[dict]:
    """Every target at each concurrency, then one streaming client; each case's calls
    in `--rounds` rounds, the targets taking turns (direct first), so that a slow spell
    of the machine falls on all of them alike and their ratios hold."""
    cases = []
    plan = [(clients, False) for clients in CONCURRENCIES]
    if args.stream_requests:
        plan.append((1, True))
    for clients, stream in plan:
        targets = [target for target in stack.targets() if target.streams or not stream]
        rounds: dict[str, list[tuple]] = {target.name: [] for target in targets}
        for index, n in enumerate(loadgen.round_sizes(args.stream_requests if stream else args.requests, args.rounds)):
            for target in targets:
                warmup = args.warmup if index == 0 else clients  # later rounds: open the connections
                rounds[target.name].append(measure_once(stack, target, clients, args, stream, n, warmup))
                stack.check_children()
        for target in targets:
            cases.append(case_of(target, clients, stream, rounds[target.name]))
            say_case(cases[-1])
    add_overheads(cases)
    return cases


def measure_stages(stack: GatewayStack, n: int, warmup: int) -> dict:
    """Our gateway's stages, timed in-process by bench/gateway_stages.py (a child with
    the stack's environment: same config, database and fake provider). It prints one
    JSON object as its last stdout line; anything else (a non-zero exit, no JSON, keys
    missing, a timeout) comes back as {"error": ...}, which the report shows."""
    target = stack.target("ours")
    argv = [sys.executable, str(ROOT / "bench" / "gateway_stages.py"), "--key", stack.api_key, "--model", MODEL]
    argv += ["--body", target.body(False).decode(), "--requests", str(n), "--warmup", str(warmup)]
    argv += ["--floor-path", FLOOR_PATH]
    env = {**os.environ, **stack.env}
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=STAGES_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"bench/gateway_stages.py did not finish in {STAGES_TIMEOUT_S} s"}
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-2000:] or f"exit status {done.returncode}"}
    try:
        stages = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"no JSON on its last stdout line: {done.stdout[-500:]!r} {done.stderr[-1500:]}"}
    missing = [key for key in STAGES_KEYS if key not in stages] if isinstance(stages, dict) else list(STAGES_KEYS)
    if missing:
        return {"error": f"its JSON lacks {', '.join(missing)}", "output": stages}
    return stages


def find(cases: list[dict], target: str, clients: int, stream: bool = False) -> dict | None:
    return next((c for c in cases if (c["target"], c["clients"], c["stream"]) == (target, clients, stream)), None)


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def aims(cases: list[dict], litellm_error: str, database: str) -> list[str]:
    """The issue's four aims, each with what was measured and whether it is met. The
    floor (a JSON 404 through gunicorn + Django + our middleware) is the yardstick of
    the first two: what our web stack costs before the gateway does anything."""
    lines = []
    ours_1, floor_1 = find(cases, "ours", 1), find(cases, "floor", 1)
    if ours_1 and floor_1:
        ours_cpu, floor_cpu = ours_1["hop_cpu_ms_per_request"], floor_1["hop_cpu_ms_per_request"]
        times = ours_cpu / floor_cpu
        lines.append(
            f"aim ({database}): our CPU per call <= {AIM_CPU_OVER_FLOOR:g}x the floor's: measured {ours_cpu:.2f} / "
            f"{floor_cpu:.2f} ms = {times:.2f}x -> {verdict(times <= AIM_CPU_OVER_FLOOR)}"
        )
        ours_added, floor_added = ours_1["added_p50_ms"], floor_1["added_p50_ms"]
        times = ours_added / max(floor_added, 1e-6)
        lines.append(
            f"aim ({database}): our added p50 at 1 client <= {AIM_ADDED_P50_OVER_FLOOR:g}x the floor's: measured "
            f"{ours_added:.2f} / {floor_added:.2f} ms = {times:.2f}x -> {verdict(times <= AIM_ADDED_P50_OVER_FLOOR)}"
        )
    ours_32, litellm_32 = find(cases, "ours", 32), find(cases, "litellm", 32)
    if ours_32 and litellm_32:
        times = ours_32["requests_per_s"] / litellm_32["requests_per_s"]
        lines.append(
            f"aim ({database}): our req/s >= {AIM_RATIO_VS_LITELLM_32_CLIENTS:g}x LiteLLM's at 32 clients: measured "
            f"{ours_32['requests_per_s']:.0f} / {litellm_32['requests_per_s']:.0f} = {times:.1f}x -> "
            + verdict(times >= AIM_RATIO_VS_LITELLM_32_CLIENTS)
        )
    else:
        why = litellm_error or "absent"
        lines.append(f"aim ({database}): req/s vs LiteLLM at 32 clients: not measured (LiteLLM: {why})")
    if ours_32:
        times = ours_32["p99_ms"] / ours_32["p50_ms"]
        lines.append(
            f"aim ({database}): our p99 <= {AIM_P99_OVER_P50_32_CLIENTS:g}x our p50 at 32 clients: measured "
            f"{ours_32['p99_ms']:.0f} / {ours_32['p50_ms']:.0f} ms = {times:.1f}x -> "
            + verdict(times <= AIM_P99_OVER_P50_32_CLIENTS)
        )
    return lines


def profile_ours(stack: GatewayStack, clients: int, seconds: int, database: str) -> dict:
    """py-spy (threads not sleeping, PROFILE_RATE_HZ) on each gunicorn worker while
    `clients` threads keep calling our gateway."""
    target = stack.target("ours")
    load = target.load(False)
    pool = Pool(target.port, clients)
    targets = [(f"web{i + 1}", pid) for i, pid in enumerate(stack.web_worker_pids())]
    try:
        processes, load_stats = profiling.profile_under_load(
            stack,
            targets,
            lambda stop: pool.run(load, 10**7, stop=stop),
            seconds,
            PROFILE_RATE_HZ,
            lambda label, _mode: f"gateway_overhead-{database}-{clients}c-{label}.speedscope.json",
            top=30,
        )
    except RuntimeError as exc:
        return {"error": f"{exc} next to this Python or on PATH"}
    finally:
        pool.close()
    return {
        "clients": clients,
        "seconds": seconds,
        "rate_hz": PROFILE_RATE_HZ,
        "mode": "threads not sleeping (py-spy default, --nonblocking)",
        "requests_per_s_under_py_spy": load_stats["requests_per_s_under_py_spy"],
        "errors": load_stats["errors"],
        "processes": {label: by_mode["active"] for label, by_mode in processes.items()},
    }


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per case (default 2000)")
    parser.add_argument(
        "--stream-requests", type=int, default=500, help="streamed requests per target at 1 client (0: skip)"
    )
    parser.add_argument("--warmup", type=int, default=100, help="warm-up requests before each case (default 100)")
    parser.add_argument(
        "--rounds", type=int, default=4, help="each case's requests in this many rounds, the targets taking turns"
    )
    parser.add_argument(
        "--stage-requests", type=int, default=500, help="requests for the in-process stage timing (0: skip)"
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres", "both"),
        default="sqlite",
        help="both: SQLite, then PostgreSQL, each on its own stack, in this one run",
    )
    parser.add_argument("--skip-litellm", action="store_true", help="measure only direct and ours")
    parser.add_argument("--profile", action="store_true", help="afterwards, py-spy our gunicorn workers under load")
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--quiet-wait", type=float, default=30, help="wait up to S s for a quiet machine per case")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp data dir (logs) even on success")
    parser.add_argument("--out", type=Path, help="the JSON to write (default bench/results/gateway_overhead*.json)")
    args = parser.parse_args()
    if args.requests < 1 or args.rounds < 1 or min(args.stream_requests, args.stage_requests, args.warmup) < 0:
        parser.error("--requests and --rounds must be positive, --stream-requests and --warmup not negative")
    return args


def measure_all(
    stack: GatewayStack, args: argparse.Namespace, database: str
) -> tuple[list[dict], dict | None, list[dict] | None]:
    """Against a started stack: the cases, our stages in-process, and the profiles."""
    say(f"ready; {args.requests} requests per case")
    cases = run_cases(stack, args)
    stages = None
    if args.stage_requests:
        say(f"timing our gateway's stages in-process ({args.stage_requests} requests)")
        stages = measure_stages(stack, args.stage_requests, args.warmup)
        if "error" in stages:
            say("the in-process stage timing failed; the report says why")
    profile = None
    if args.profile:
        profile = []
        for clients in CONCURRENCIES:
            say(f"profiling our gunicorn workers for {args.profile_seconds} s under {clients} client(s)")
            profile.append(profile_ours(stack, clients, args.profile_seconds, database))
    return cases, stages, profile


def result_json(stack: GatewayStack, args: argparse.Namespace, cases: list[dict], aim_lines: list[str]) -> dict:
    ours_32, litellm_32 = find(cases, "ours", 32), find(cases, "litellm", 32)
    return result_head("gateway_overhead", VERSIONED) | {
        "config": {
            **stack.describe("sqlite (temp data dir, WAL)"),
            "ours": f"gunicorn gthread, {WEB_WORKERS} workers x {WEB_THREADS} threads (config defaults), "
            "access log on, no Celery worker",
            "web_workers": WEB_WORKERS,
            "web_threads": WEB_THREADS,
            "litellm": {
                "version": stack.litellm_version or None,
                "workers": 1,
                "error": stack.litellm_error or None,
                "install": " && ".join(LITELLM_INSTALL),
                "run": "litellm --config litellm.yaml --host 127.0.0.1 --port P "
                "(defaults: 1 uvicorn worker, access log on); master key, no database; "
                "env: LITELLM_LOCAL_MODEL_COST_MAP=True, nothing else",
                "config_yaml": litellm_config_yaml(stack.upstream_port),
            },
            "upstream": "bench/fake_upstream.py (stdlib ThreadingHTTPServer, HTTP/1.1 keep-alive, fixed answer)",
            "load_generator": loadgen.DESCRIPTION,
            "request": json.loads(stack.target("ours").body(False)),
            "requests_per_case": args.requests,
            "rounds": args.rounds,
            "stream_requests": args.stream_requests,
            "warmup": args.warmup,
            "concurrencies": list(CONCURRENCIES),
            "toml": stack.config_text,
        },
        "aims": {
            "cpu_over_floor_max": AIM_CPU_OVER_FLOOR,
            "added_p50_over_floor_max": AIM_ADDED_P50_OVER_FLOOR,
            "throughput_ratio_vs_litellm_32_clients_min": AIM_RATIO_VS_LITELLM_32_CLIENTS,
            "p99_over_p50_32_clients_max": AIM_P99_OVER_P50_32_CLIENTS,
            "throughput_ratio_vs_litellm_32_clients": (
                round(ours_32["requests_per_s"] / litellm_32["requests_per_s"], 2) if ours_32 and litellm_32 else None
            ),
            "statements": aim_lines,
        },
        "cases": cases,
        "errors_total": sum(c["errors"] + c["warmup_errors"] for c in cases),
    }


def run_for(database: str, args: argparse.Namespace) -> tuple[int, list[str]]:
    """One database's stack, cases, tables and JSON: (exit status, its aim lines)."""
    tmp = Path(tempfile.mkdtemp(prefix="dla-bench-gw-"))
    stack = GatewayStack(database, tmp, args.skip_litellm)
    measured, exit_code = run_on_stack(stack, tmp, args.keep_tmp, lambda: measure_all(stack, args, database))
    if measured is None:
        return exit_code, [f"aims ({database}): not measured (the stack failed)"]
    cases, stages, profile = measured
    print(
        f"\ngateway overhead: POST /v1/chat/completions ({len(PROMPT)}-char prompt, max_tokens {MAX_TOKENS}); "
        f"ours: gunicorn gthread {WEB_WORKERS}x{WEB_THREADS}, {database}; "
        f"LiteLLM {stack.litellm_version or '-'} (1 worker)"
        + (f" UNAVAILABLE: {stack.litellm_error}" if stack.litellm_error else "")
        + f"; {os.cpu_count()} CPUs\n"
    )
    print_cases(cases)
    print_cpu(cases, with_sys=False, min_ms=0.005)
    if stages:
        ours_1, floor_1 = find(cases, "ours", 1), find(cases, "floor", 1)
        print_stages(stages, ours_1["p50_ms"] if ours_1 else None, floor_1["p50_ms"] if floor_1 else None)
    aim_lines = aims(cases, stack.litellm_error, database)
    print("\n" + "\n".join(aim_lines))
    for summary in profile or []:
        print_profile(summary)
    result = result_json(stack, args, cases, aim_lines)
    result["stages_in_process"] = stages
    result["profile"] = profile
    name = "gateway_overhead.json" if database == "sqlite" else "gateway_overhead-postgres.json"
    out = args.out if args.out and args.database != "both" else RESULTS_DIR / name
    write_result(result, out)
    if result["errors_total"]:
        print_request_errors(result["errors_total"], cases)
        return 1, aim_lines
    return 0, aim_lines


def main() -> int:
    args = parse_args()
    install_signal_handlers()
    databases = ("sqlite", "postgres") if args.database == "both" else (args.database,)
    statuses, all_aims = [], []
    for database in databases:
        status, aim_lines = run_for(database, args)
        statuses.append(status)
        all_aims += aim_lines
        if status in (2, 130):
            break
    if len(databases) > 1:
        print("\nall aims of this run:\n" + "\n".join(all_aims))
    return max(statuses)


if __name__ == "__main__":
    sys.exit(main())
