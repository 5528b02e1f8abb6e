"""Round trip of `POST /api/` against calling the algorithm in-process.

Measures what the queued path (gunicorn, Django, the job row, Redis, Celery, the
worker, the answer back) costs over the cheapest algorithm there is, `Echo` with no
delay. Starts its own stack in a temporary data dir (`stack.Stack`: embedded Redis
unless REDIS_URL is set, SQLite or PostgreSQL, one `cpu` Celery worker, gunicorn
gthread 2 workers x 32 threads as `manage.py serve` does), then measures in ONE run:

  (a) `algorithms.echo:Echo().run(text)` in-process, N times;
  (b) `POST /api/` from 1 client (keep-alive, `loadgen`), taking turns in `--rounds`
      rounds (4) with its yardstick, a bare Celery no-op round trip
      (`bench/celery_noop.py`), so that a slow spell of a shared VM falls on both;
  (c) `POST /api/` from 16 concurrent clients (a thread and a connection each);
  (d) with `--observability N`: a second stack beside the first, the same but with
      the Prometheus metrics and the daily usage rollups off (`[metrics] enabled`,
      `[server] usage_rollups`), and N calls to each from 1 client, alternating
      between them call by call (the order swapped every pair), so both see the same
      machine at the same moments; what metrics + rollups add to the p50 and to the
      server CPU per call (aim <= 0.3 ms).

Every response must be 200 with the echoed text; any error is counted, reported
loudly, and makes the exit status non-zero. Per case: p50/p90/p99, req/s, the ratio to
the in-process call, CPU ms per request per process (`cpu.CpuMeter`) and the server-side
stages from the job rows. Prints a table, writes `bench/results/roundtrip-<database>.json`.
With `--profile`, afterwards runs py-spy on the gunicorn workers and the Celery
processes during a 16-client load and summarises where the time goes. Every process it
starts is stopped on exit, error or Ctrl-C.

    .venv/bin/python bench/roundtrip.py [--requests N] [--rounds 4] [--database sqlite|postgres] [--profile]
        [--observability N]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import celery_noop
import loadgen
import profiling
from cpu import CpuMeter, merged_meters, wait_for_quiet
from internals import JOB_TABLE, KEY_TABLE, USAGE_TABLE, as_epoch, key_prefix
from loadgen import CallError, Load, Outcome, Pool, Reply, Timing, merged, round_sizes
from report import (
    RESULTS_DIR,
    case_summary,
    fmt,
    fmt_ms,
    fmt_ratio,
    latency_summary,
    print_columns,
    print_cpu,
    print_request_errors,
    result_head,
    say,
    say_case,
    spread,
    write_result,
)
from stack import Stack, deployment_toml, install_signal_handlers, run_on_stack, server_toml

# isort: split
# After `stack`, which puts the project root on sys.path.
from algorithms.loader import build_algorithm

ALGORITHM = "algorithms.echo:Echo"
MODEL = "echo"
DEVICE = "cpu"
WEB_WORKERS = 2
WEB_THREADS = 32
AIM_P50_OVER_BARE_CELERY = 2.0  # issue #13: p50 at 1 client <= 2x a bare Celery no-op round trip
AIM_RPS_16_CLIENTS = 250.0
AIM_OBSERVABILITY_ADDED_P50_MS = 0.3
PROFILE_RATE_HZ = 200
STAGE_SPREAD = ("p50", "p90", "p99", "mean")


# ---------------------------------------------------------------- stack


class RoundtripStack(Stack):
    """The shared stack with one `cpu` worker, plus where this benchmark reads the
    server-side stages from: the worker log and the job rows. `observability` False:
    metrics and rollups off (case d's second stack)."""

    def __init__(self, database: str, tmp: Path, observability: bool = True) -> None:
        config = lambda tmp, port: bench_config_toml(tmp, port, observability)  # noqa: E731
        super().__init__(database, tmp, config, [DEVICE], WEB_WORKERS, WEB_THREADS)

    def worker_log_size(self) -> int:
        path = self.logs / "worker-cpu.log"
        return path.stat().st_size if path.exists() else 0

    def worker_task_runtimes(self, offset: int) -> list[float]:
        """Celery's INFO line per task: 'Task llmjobs.run_job[...] succeeded in 0.0123s'."""
        with open(self.logs / "worker-cpu.log", "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
        return [float(m) for m in re.findall(r"run_job\[[^\]]+\] succeeded in ([0-9.eE-]+)s", text)]

    def job_times(self, tag: str) -> list[tuple[float | None, ...]]:
        """(created_at, started_at, finished_at) as Unix seconds of this run's jobs whose text carries `tag`."""
        rows = self.query(
            f"SELECT j.created_at, j.started_at, j.finished_at FROM {JOB_TABLE} j "
            f"JOIN {KEY_TABLE} k ON k.id = j.api_key_id WHERE k.prefix = {{p}} AND j.input_text LIKE {{p}}",
            [key_prefix(self.api_key), f"roundtrip {tag} #%"],
        )
        return [tuple(as_epoch(v) for v in row) for row in rows]


def bench_config_toml(tmp: Path, port: int, observability: bool = True) -> str:
    """The benchmark's config; `observability` False switches the metrics and the daily
    rollups off (both are on by default, as in every other config)."""
    head = server_toml("roundtrip.py", tmp, port, web_workers=WEB_WORKERS, web_threads=WEB_THREADS, default_model=MODEL)
    switch = "true" if observability else "false"
    head += f"usage_rollups = {switch}\n\n[metrics]\nenabled = {switch}\n"
    return head + "\n[worker]\npreload = true\n" + deployment_toml(MODEL, ALGORITHM, DEVICE, "delay_ms = 0")


# ---------------------------------------------------------------- measurement


def text_for(tag: str, i: int, chars: int) -> str:
    head = f"roundtrip {tag} #{i}: "
    filler = "the quick brown fox jumps over the lazy dog "
    return (head + filler * (1 + chars // len(filler)))[: max(chars, len(head))]


def post_load(stack: Stack, tag: str, chars: int) -> Load:
    """`POST /api/` with call i's own text (tagged, so its job row can be found again),
    checked to come back echoed, with our model and a job id."""

    def check(i: int, reply: Reply) -> None:
        try:
            answer = json.loads(reply.body)
        except ValueError:
            raise CallError("bad JSON", reply.body.decode("utf-8", "replace")) from None
        ok = isinstance(answer, dict) and answer.get("job_id") and answer.get("model") == MODEL
        if not ok or answer.get("message") != text_for(tag, i, chars):
            raise CallError("wrong body", json.dumps(answer)[:300])

    headers = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
    body = lambda i: json.dumps({"text": text_for(tag, i, chars), "model": MODEL}).encode()  # noqa: E731
    return Load("/api/", headers, body, check=check)


def measure_in_process(n: int, chars: int) -> dict:
    algorithm = build_algorithm(ALGORITHM, DEVICE, {"delay_ms": 0})
    texts = [text_for("inproc", i, chars) for i in range(n)]
    for text in texts[:50]:
        algorithm.run(text)
    outcome = Outcome(attempted=n)
    clock = time.perf_counter
    with CpuMeter(None) as meter:
        started = clock()
        for text in texts:
            t0 = clock()
            out = algorithm.run(text)
            elapsed = clock() - t0
            if out == text:
                outcome.timings.append(Timing(elapsed))
            else:
                outcome.add_error("wrong text", repr(out))
        outcome.wall_s = clock() - started
    return case_summary("in-process Echo().run", outcome) | meter.report(n)


def measure_http(stack: RoundtripStack, clients: int, args: argparse.Namespace, tag: str = "") -> dict:
    """Warm up, then `args.requests` POSTs from `clients` clients, CPU metered."""
    tag = tag or f"c{clients}"
    return http_case(stack, clients, tag, [http_once(stack, clients, args, tag, args.requests, args.warmup)])


def http_once(stack: RoundtripStack, clients: int, args: argparse.Namespace, tag: str, n: int, warmup: int) -> tuple:
    """One round of an HTTP case: (outcome, meter, warm-up, busy share before, the
    worker's task runtimes meanwhile)."""
    with Pool(stack.port, clients) as pool:
        idle_busy = wait_for_quiet(args.quiet_wait)
        warm = pool.warm_up(post_load(stack, f"warm{clients}", args.text_chars), warmup)
        log_offset = stack.worker_log_size()
        with CpuMeter(stack) as meter:
            outcome = pool.run(post_load(stack, tag, args.text_chars), n)
    return outcome, meter, warm, idle_busy, stack.worker_task_runtimes(log_offset)


def http_case(stack: RoundtripStack, clients: int, tag: str, rounds: list[tuple]) -> dict:
    """The case of one or more rounds (`http_once`): latencies pooled, CPU summed."""
    outcome = merged([run[0] for run in rounds])
    name = f"POST /api/, {clients} client{'s' if clients > 1 else ''}"
    result = case_summary(name, outcome, merged([run[2] for run in rounds]))
    result["clients"], result["rounds"] = clients, len(rounds)
    result["machine_busy_share_before"] = round(max(run[3] for run in rounds), 3)
    result.update(merged_meters([run[1] for run in rounds]).report(len(outcome.timings)))
    runtimes = [runtime for run in rounds for runtime in run[4]]
    result["server_stages_ms"] = server_stages(stack, tag, runtimes, outcome.wall_s)
    return result


def one_client_in_rounds(stack: RoundtripStack, args: argparse.Namespace) -> tuple[dict, dict]:
    """The bare Celery round trip and ours from one client, taking turns in `--rounds`
    rounds, so that a slow spell of a shared VM falls on both: (bare case, ours)."""
    bare, ours = [], []
    for index, n in enumerate(round_sizes(args.requests, args.rounds)):
        warmup = args.warmup if index == 0 else 1
        bare.append(celery_noop.measure_once(stack, n, warmup, args.text_chars))
        ours.append(http_once(stack, 1, args, "c1", n, warmup))
    return celery_noop.summary(bare), http_case(stack, 1, "c1", ours)


def server_stages(stack: RoundtripStack, tag: str, task_runtimes: list[float], wall_s: float) -> dict:
    """Where a request's time goes on the server, from the job rows and the worker log:
    queue_wait = started_at - created_at (INSERT commit, enqueue, broker, task thread hand-off,
    cancel check); run = finished_at - started_at (claim UPDATE, algorithm, emit);
    celery_task = Celery's own 'succeeded in' runtime of the task body; worker_busy_share
    = sum of task runtimes / wall time (near 1: the single worker is the bottleneck)."""
    stages: dict = {}
    try:
        rows = stack.job_times(tag)
        queue_wait = [started - created for created, started, _f in rows if started]
        run = [finished - started for _c, started, finished in rows if started and finished]
        stages["queue_wait"] = spread(queue_wait, 1000, STAGE_SPREAD)
        stages["run"] = spread(run, 1000, STAGE_SPREAD)
    except Exception as exc:  # diagnostics only; never fail the run for them
        stages["job_rows_error"] = f"{type(exc).__name__}: {exc}"
    stages["celery_task"] = spread(task_runtimes, 1000, STAGE_SPREAD)
    stages["worker_busy_share"] = round(sum(task_runtimes) / wall_s, 3) if wall_s else None
    return stages


def profile_under_load(stack: RoundtripStack, clients: int, seconds: int, chars: int, database: str) -> dict:
    """py-spy on each gunicorn worker and both Celery processes while `clients` clients
    keep POSTing, once per mode in `profiling.MODES`."""
    targets = [(f"web{i + 1}", pid) for i, pid in enumerate(stack.web_worker_pids())]
    targets.append(("celery-parent", stack.worker_pid(DEVICE)))
    children = stack.celery_child_pids(DEVICE)
    targets += [(f"celery-child{'' if i == 0 else i + 1}", pid) for i, pid in enumerate(children)]
    pool = Pool(stack.port, clients)
    load = post_load(stack, "prof", chars)
    try:
        processes, load_stats = profiling.profile_under_load(
            stack,
            targets,
            lambda stop: pool.run(load, 10**6, stop=stop),
            seconds,
            PROFILE_RATE_HZ,
            lambda label, mode: f"roundtrip-{database}-{label}-{mode}.speedscope.json",
            profiling.MODES,
        )
    except RuntimeError as exc:
        return {"error": str(exc)}
    finally:
        pool.close()
    return {
        "clients": clients,
        "seconds_per_mode": seconds,
        "rate_hz": PROFILE_RATE_HZ,
        "modes": profiling.MODE_MEANINGS,
        "load": load_stats,
        "processes": processes,
    }


def measure_observability(args: argparse.Namespace) -> dict:
    """Case (d): two fresh stacks started alike, metrics and rollups on in one and off
    in the other (neither has served another case), the same calls alternating between
    them."""
    tmps = {mode: Path(tempfile.mkdtemp(prefix=f"dla-bench-{mode}-")) for mode in ("on", "off")}
    stacks = {mode: RoundtripStack(args.database, tmp, observability=mode == "on") for mode, tmp in tmps.items()}
    try:
        for mode, twin in stacks.items():
            say(f"starting the {mode!r} stack: metrics and rollups {mode}")
            twin.start()
        before = {mode: usage_rows(s) for mode, s in stacks.items()}
        alternate(stacks, args.warmup, args.text_chars, "obswarm")
        wait_for_quiet(args.quiet_wait)
        meters = {mode: CpuMeter(s) for mode, s in stacks.items()}
        for meter in meters.values():
            meter.__enter__()
        times = alternate(stacks, args.observability, args.text_chars, "obs")
        for meter in meters.values():
            meter.__exit__(None, None, None)
        modes = {}
        for mode, s in stacks.items():
            report = meters[mode].report(len(times[mode]))
            modes[mode] = {
                **latency_summary(times[mode]),
                "calls": len(times[mode]),
                "server_cpu_ms": round(server_cpu(report["cpu_ms_per_request"]), 4),
                "cpu_ms_per_request": report["cpu_ms_per_request"],
                "metrics_status": metrics_status(s),
                "rolled_up": usage_rows(s) - before[mode],
            }
        check_switches(modes)
        for twin in stacks.values():
            twin.check_children()
    finally:
        for mode, twin in stacks.items():
            twin.stop()
            shutil.rmtree(tmps[mode], ignore_errors=True)
    paired = sorted(a - b for a, b in zip(times["on"], times["off"], strict=True))
    return {
        "modes": modes,
        "added_p50_ms": round(modes["on"]["p50_ms"] - modes["off"]["p50_ms"], 4),
        "paired_median_ms": round(1000 * paired[len(paired) // 2], 4),
        "added_server_cpu_ms": round(modes["on"]["server_cpu_ms"] - modes["off"]["server_cpu_ms"], 4),
    }


def alternate(stacks: dict[str, RoundtripStack], calls: int, chars: int, tag: str) -> dict[str, list[float]]:
    """`calls` POSTs to each stack from one keep-alive connection each, one stack then
    the other, the order swapped every pair; each answer checked. Seconds per call."""
    connections = {mode: http.client.HTTPConnection("127.0.0.1", s.port, timeout=30) for mode, s in stacks.items()}
    times: dict[str, list[float]] = {mode: [] for mode in stacks}
    try:
        for i in range(calls):
            order = list(stacks) if i % 2 == 0 else list(reversed(stacks))
            for mode in order:
                text = text_for(f"{tag}{mode}", i, chars)
                body = json.dumps({"text": text, "model": MODEL}).encode()
                headers = {"Authorization": f"Bearer {stacks[mode].api_key}", "Content-Type": "application/json"}
                started = time.perf_counter()
                connections[mode].request("POST", "/api/", body, headers)
                reply = connections[mode].getresponse()
                answer = reply.read()
                took = time.perf_counter() - started
                if reply.status != 200 or json.loads(answer).get("message") != text:
                    raise RuntimeError(f"{mode}: call {i} answered {reply.status}: {answer[:200]!r}")
                times[mode].append(took)
    finally:
        for connection in connections.values():
            connection.close()
    return times


def server_cpu(per_request: dict[str, float]) -> float:
    return sum(ms for name, ms in per_request.items() if name != "bench client (this process)")


def usage_rows(stack: RoundtripStack) -> int:
    """The requests the daily rollups have counted (0 before any)."""
    (total,) = stack.query(f"SELECT COALESCE(SUM(requests), 0) FROM {USAGE_TABLE}")[0]
    return int(total)


def metrics_status(stack: RoundtripStack) -> int:
    """The status of GET /metrics from loopback (allowed: the bench config sets no token)."""
    try:
        with urllib.request.urlopen(f"{stack.base_url}/metrics", timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def check_switches(modes: dict[str, dict]) -> None:
    """The switches really took: /metrics served (on) or 404 (off), the calls rolled up
    (on) or not (off)."""
    on, off = modes["on"], modes["off"]
    if on["metrics_status"] != 200 or on["rolled_up"] < on["calls"]:
        raise RuntimeError(f"observability on: /metrics {on['metrics_status']}, {on['rolled_up']} calls rolled up")
    if off["metrics_status"] != 404 or off["rolled_up"] != 0:
        raise RuntimeError(f"observability off: /metrics {off['metrics_status']}, {off['rolled_up']} calls rolled up")


# ---------------------------------------------------------------- output


def print_cases(cases: list[dict]) -> None:
    base = cases[0]  # in-process
    print_columns(
        [
            ("case", lambda c: c["case"]),
            ("requests", lambda c: str(c["requests"])),
            ("errors", lambda c: str(c["errors"])),
            ("p50 ms", lambda c: fmt_ms(c["p50_ms"])),
            ("p90 ms", lambda c: fmt_ms(c["p90_ms"])),
            ("p99 ms", lambda c: fmt_ms(c["p99_ms"])),
            ("req/s", lambda c: fmt(c["requests_per_s"], 0)),
            ("p50 / in-proc", lambda c: "1x" if c is base else fmt_ratio(c["p50_ms"], base["p50_ms"], 0)),
            (
                "in-proc req/s / req/s",
                lambda c: "1x" if c is base else fmt_ratio(base["requests_per_s"], c["requests_per_s"], 0),
            ),
        ],
        cases,
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
        busy = 100 * (stages.get("worker_busy_share") or 0)
        print(f"  {case['case']}: " + ", ".join(parts) + f"; worker busy {busy:.0f}%")


def aims(bare: dict, one: dict, many: dict, clients: int) -> list[str]:
    """The issue's two aims: p50 at 1 client against the bare Celery round trip measured
    in this run, and req/s at `clients` clients."""
    limit = AIM_P50_OVER_BARE_CELERY * bare["p50_ms"]
    met_p50 = one["p50_ms"] <= limit
    met_rps = many["requests_per_s"] >= AIM_RPS_16_CLIENTS
    return [
        f"aim: p50 at 1 client <= {AIM_P50_OVER_BARE_CELERY:g}x the bare Celery no-op's ({bare['p50_ms']:.2f} ms): "
        f"measured {one['p50_ms']:.2f} ms = {one['p50_ms'] / bare['p50_ms']:.2f}x -> "
        + ("met" if met_p50 else "NOT met"),
        f"aim: >= {AIM_RPS_16_CLIENTS:g} req/s at {clients} clients: measured {many['requests_per_s']:.0f} req/s -> "
        + ("met" if met_rps else "NOT met"),
    ]


def print_observability(summary: dict) -> str:
    modes = summary["modes"]
    print("\n(d) metrics + daily rollups on vs off: two stacks side by side, 1 client alternating call by call:")
    print_columns(
        [
            ("stack", lambda m: m[0]),
            ("calls", lambda m: str(m[1]["calls"])),
            ("p50 ms", lambda m: fmt_ms(m[1]["p50_ms"])),
            ("p90 ms", lambda m: fmt_ms(m[1]["p90_ms"])),
            ("p99 ms", lambda m: fmt_ms(m[1]["p99_ms"])),
            ("server CPU ms/call", lambda m: fmt(m[1]["server_cpu_ms"], 3)),
            ("/metrics", lambda m: str(m[1]["metrics_status"])),
            ("rolled up", lambda m: str(m[1]["rolled_up"])),
        ],
        list(modes.items()),
    )
    added = summary["added_p50_ms"]
    print(
        f"added: p50 {added:+.3f} ms (median of paired differences {summary['paired_median_ms']:+.3f} ms), "
        f"server CPU {summary['added_server_cpu_ms']:+.3f} ms per call"
    )
    verdict = "met" if added <= AIM_OBSERVABILITY_ADDED_P50_MS else "NOT met"
    return (
        f"aim: metrics + rollups add <= {AIM_OBSERVABILITY_ADDED_P50_MS:g} ms to p50   "
        f"measured {added:+.3f} ms -> {verdict}"
    )


def print_profile(summary: dict) -> None:
    if "error" in summary:
        print(f"\nprofile: {summary['error']}")
        return
    load = summary["load"]
    print(
        f"\nprofile: py-spy {summary['seconds_per_mode']} s per mode at {summary['rate_hz']} Hz under "
        f"{summary['clients']} clients; {load['ok']} requests "
        f"({load['requests_per_s_under_py_spy']} req/s under py-spy), {load['errors']} errors"
    )
    for mode, meaning in summary["modes"].items():
        print(f"  mode {mode}: {meaning}")
    titled = [
        (f"{label} / {mode}", e) for label, by_mode in summary["processes"].items() for mode, e in by_mode.items()
    ]
    profiling.print_entries(titled, 8, [("top self", "self_top", 8), ("our code, inclusive", "own_code_inclusive", 8)])


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per case (default 2000)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients for case (c) (default 16)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up requests before each HTTP case (default 50)")
    parser.add_argument("--text-chars", type=int, default=64, help="length of each echoed text (default 64)")
    parser.add_argument(
        "--rounds", type=int, default=4, help="the bare Celery and our 1-client case take turns in this many rounds"
    )
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
    parser.add_argument(
        "--observability",
        type=int,
        default=0,
        metavar="N",
        help="afterwards, N calls each to this stack and a twin with metrics + rollups off, alternating (0: skip)",
    )
    args = parser.parse_args()
    if args.requests < 1 or args.clients < 1 or args.rounds < 1:
        parser.error("--requests, --clients and --rounds must be positive")
    return args


def measure_all(stack: RoundtripStack, args: argparse.Namespace) -> tuple[list[dict], dict | None]:
    """All cases against a started stack: in-process, 1 client, N clients; then the profile."""
    say(f"ready; measuring {args.requests} requests per case")
    cases = [measure_in_process(args.requests, args.text_chars)]
    say(f"in-process done: p50 {fmt_ms(cases[0]['p50_ms'])} ms")
    say("starting a bare Celery worker with a no-op task (the round trip's yardstick)")
    celery_noop.start_worker(stack)
    cases += one_client_in_rounds(stack, args)
    say_case(cases[-1])
    cases.append(measure_http(stack, args.clients, args))
    say_case(cases[-1])
    if args.observability:
        cases.append({"case": "observability", "observability": measure_observability(args)})
    profile = None
    if args.profile:
        say(f"profiling {args.profile_seconds} s under {args.clients}-client load with py-spy")
        profile = profile_under_load(stack, args.clients, args.profile_seconds, args.text_chars, args.database)
    return cases, profile


def result_json(stack: RoundtripStack, args: argparse.Namespace, cases: list[dict], aim_lines: list[str]) -> dict:
    return result_head("roundtrip") | {
        "config": {
            **stack.describe(),
            "web": f"gunicorn gthread, {WEB_WORKERS} workers x {WEB_THREADS} threads, access log on",
            "worker": "manage.py runworker cpu (Celery threads pool, one thread per held job)",
            "bare_celery": "bench/celery_noop.py: the same Redis as broker and result backend, "
            "--pool threads -c 1, send_task(...).get()",
            "load_generator": loadgen.DESCRIPTION,
            "requests_per_case": args.requests,
            "rounds_at_1_client": args.rounds,
            "clients": args.clients,
            "warmup": args.warmup,
            "text_chars": args.text_chars,
            "toml": stack.config_text,
        },
        "aims": {
            "p50_1_client_over_bare_celery_max": AIM_P50_OVER_BARE_CELERY,
            "requests_per_s_16_clients_min": AIM_RPS_16_CLIENTS,
            "statements": aim_lines,
        },
        "cases": cases,
        "errors_total": sum(c["errors"] + c.get("warmup_errors", 0) for c in cases),
    }


def main() -> int:
    args = parse_args()
    install_signal_handlers()
    tmp = Path(tempfile.mkdtemp(prefix="dla-bench-"))
    stack = RoundtripStack(args.database, tmp)
    measured, exit_code = run_on_stack(stack, tmp, args.keep_tmp, lambda: measure_all(stack, args))
    if measured is None:
        return exit_code
    cases, profile = measured
    print(
        f"\nroundtrip, database={args.database}, "
        f"redis={'embedded (unix socket)' if stack.embedded_redis else 'REDIS_URL'}, "
        f"gunicorn gthread {WEB_WORKERS}x{WEB_THREADS}, 1 cpu worker, echo (delay 0), {args.text_chars}-char texts, "
        f"{os.cpu_count()} CPUs\n"
    )
    observability = next((c["observability"] for c in cases if "observability" in c), None)
    cases = [c for c in cases if "observability" not in c]
    print_cases(cases)
    print_cpu(cases)
    print_stages(cases)
    aim_lines = aims(cases[1], cases[2], cases[3], args.clients)
    if observability:
        aim_lines.append(print_observability(observability))
    print("\n" + "\n".join(aim_lines))
    if profile:
        print_profile(profile)
    result = result_json(stack, args, cases, aim_lines)
    result["profile"] = profile
    result["observability"] = observability
    write_result(result, RESULTS_DIR / f"roundtrip-{args.database}.json")
    if result["errors_total"]:
        print_request_errors(result["errors_total"], cases[1:], with_kinds=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
