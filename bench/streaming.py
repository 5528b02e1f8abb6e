"""Streamed chat completions: time to first token and decode speed through the real stack
against in-process generation, and how many idle streams one web process holds.

Starts its own stack in a temporary data dir (`stack.Stack`, as bench/roundtrip.py does:
embedded Redis, SQLite or PostgreSQL, gunicorn gthread) with two devices, each with its
own worker:

  `cpu`    SmolLM2-135M-Instruct (`algorithms.transformers_lm:TextGeneration`)
  `cpu:1`  `algorithms.echo:Echo` streaming one word a second forever (the idle-stream load)

and measures in ONE run:

  1. (`streaming_ttft`) TTFT and decode tokens/s of `POST /v1/chat/completions` with
     `stream: true` (`loadgen.stream_once` reading the SSE stream, tokens from the usage
     chunk) against `TextGeneration.generate` in this process (same model dir, dtype,
     prompt, max_tokens, temperature 0, torch's default thread count in both). The two
     alternate, one at a time (this machine has 2 cores), after a warm-up of each; a
     pair during which other processes took over a tenth of the CPU is set aside and
     re-run. Each server run is split into stages from its job row and the Redis
     stream's entry ids.
  2. (`streaming_idle`) Idle streams: gunicorn restarted with ONE worker process and T
     threads (e.g. 32, 256, 1024); T streams opened on the echo model (one job runs, the
     rest wait queued: a client holding a connection and a web thread), then a few more
     than T; all held a few seconds while the web worker's RSS, CPU, threads and fds are
     read; then closed, and each job checked to have been cancelled, and how long after
     its client left.

Prints two tables, writes `bench/results/streaming.json`. Every process it starts is
stopped on exit, error or Ctrl-C.

    .venv/bin/python bench/streaming.py [--reps 5] [--max-tokens 64] [--threads 32,256,1024]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from report import RESULTS_DIR, result_head, say, write_result
from stack import Stack, deployment_toml, install_signal_handlers, prepared_model, run_on_stack, server_toml
from streaming_idle import IDLE_DEVICE, IDLE_MODEL, OPEN_CONCURRENCY, measure_idle_streams, print_idle
from streaming_ttft import (
    GEN_ALGORITHM,
    GEN_DEVICE,
    GEN_MODEL,
    PROMPT,
    load_in_process,
    measure_generation,
    print_generation,
    torch_threads_report,
)

# isort: split
# After `stack`, which puts the project root on sys.path.

GEN_MODEL_DIR = "smollm2-135m-instruct"
DEFAULT_MODELS_DIR = Path("/tmp/bench-stream-data/models")
PART1_WEB = (2, 32)  # what `serve` starts by default
VERSIONED = ("Django", "djangorestframework", "gunicorn", "celery", "kombu", "redis", "torch", "transformers", "psutil")


def bench_config_toml(models_dir: Path, max_tokens: int, dtype: str) -> Callable[[Path, int], str]:
    """The TOML writer the Stack calls with its temp dir and port. The queue depth is
    raised so that a thousand queued idle jobs are not refused with 429 queue_full."""

    def write(tmp: Path, port: int) -> str:
        head = server_toml(
            "streaming.py",
            tmp,
            port,
            web_workers=PART1_WEB[0],
            web_threads=PART1_WEB[1],
            default_model=GEN_MODEL,
            max_queue_depth=100000,
            job_timeout_s=300,
        )
        gen_options = f'model_path = "{models_dir / GEN_MODEL_DIR}", max_new_tokens = {max_tokens}, dtype = "{dtype}"'
        idle_options = "token_delay_ms = 1000, repeat = true, max_new_tokens = 100000"
        return (
            head
            + "\n[worker]\npreload = true\n"
            + deployment_toml(GEN_MODEL, GEN_ALGORITHM, GEN_DEVICE, gen_options)
            + deployment_toml(IDLE_MODEL, "algorithms.echo:Echo", IDLE_DEVICE, idle_options)
        )

    return write


def raise_fd_limit() -> tuple[int, int]:
    """A thousand streams need a few thousand sockets here and in the children (which
    inherit the limit): raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="measured generations per side (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured generations per side first (default 1)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each generation (default 64)")
    parser.add_argument("--dtype", default="auto", help="the deployment's dtype option (default auto)")
    parser.add_argument("--threads", default="32,256,1024", help="web_threads values for part 2 (default 32,256,1024)")
    parser.add_argument("--extra-streams", type=int, default=16, help="streams beyond the thread count (default 16)")
    parser.add_argument("--hold-s", type=float, default=5.0, help="how long to hold the streams open (default 5)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help=f"default {DEFAULT_MODELS_DIR}")
    parser.add_argument(
        "--quiet-wait", type=float, default=15, help="before each generation pair, wait up to S s for a quiet machine"
    )
    parser.add_argument("--skip-generation", action="store_true", help="only part 2")
    parser.add_argument("--skip-idle", action="store_true", help="only part 1")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp data dir (logs) even on success")
    args = parser.parse_args()
    args.thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.reps < 1 or args.max_tokens < 2 or any(t < 1 for t in args.thread_counts):
        parser.error("--reps and --threads must be positive, --max-tokens at least 2")
    return args


def run(args: argparse.Namespace, stack: Stack, model_dir: Path) -> tuple[dict | None, list[dict], dict]:
    """Both parts against a started stack; (part 1, part 2, setup facts)."""
    setup: dict[str, Any] = {"max_tokens": args.max_tokens, "reps": args.reps, "warmup": args.warmup}
    generation = None
    if not args.skip_generation:
        say("loading the model in this process too")
        algorithm = load_in_process(model_dir, args.max_tokens, args.dtype)
        setup["dtype"] = str(algorithm.dtype).removeprefix("torch.")
        generation = measure_generation(stack, algorithm, args.reps, args.warmup, args.max_tokens, args.quiet_wait)
        setup["torch_threads"] = torch_threads_report(stack)
        del algorithm
    idle = [] if args.skip_idle else measure_idle_streams(stack, args.thread_counts, args.extra_streams, args.hold_s)
    return generation, idle, setup


def idle_problems(cases: list[dict]) -> list[str]:
    """What makes part 2's numbers suspect: errors, or jobs left uncancelled."""
    problems = []
    for c in cases:
        if c["errors"]:
            problems.append(f"{c['threads']} threads: {c['errors']} stream errors, e.g. {c['error_samples'][:2]}")
        if c["jobs_cancelled"] != c["jobs_expected"]:
            problems.append(f"{c['threads']} threads: jobs {c['jobs_by_status']}, expected all cancelled")
    return problems


def result_json(args: argparse.Namespace, stack: Stack, model_dir: Path, fd_limit: tuple[int, int]) -> dict:
    """The result file's head and config; the caller adds the measurements."""
    return result_head("streaming", VERSIONED) | {
        "config": {
            **stack.describe(),
            "part1_web": f"gunicorn gthread {PART1_WEB[0]} workers x {PART1_WEB[1]} threads",
            "part2_web": "gunicorn gthread 1 worker x T threads "
            "(processes.gunicorn_argv: worker_connections max(1000, 2 x T))",
            "workers": f"manage.py runworker {GEN_DEVICE} (SmolLM2), manage.py runworker {IDLE_DEVICE} (echo)",
            "model_dir": str(model_dir),
            "prompt": PROMPT,
            "thread_counts": args.thread_counts,
            "extra_streams": args.extra_streams,
            "hold_s": args.hold_s,
            "open_concurrency": OPEN_CONCURRENCY,
            "nofile_limit": list(fd_limit),
            "toml": stack.config_text,
        }
    }


def main() -> int:
    args = parse_args()
    install_signal_handlers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub, here or in the worker
    fd_limit = raise_fd_limit()
    model_dir = prepared_model(args.models_dir.resolve(), GEN_MODEL_DIR)
    tmp = Path(tempfile.mkdtemp(prefix="dla-bench-stream-"))
    toml = bench_config_toml(args.models_dir.resolve(), args.max_tokens, args.dtype)
    stack = Stack(args.database, tmp, toml, [GEN_DEVICE, IDLE_DEVICE], *PART1_WEB)
    measured, exit_code = run_on_stack(stack, tmp, args.keep_tmp, lambda: run(args, stack, model_dir))
    if measured is None:
        return exit_code
    generation, idle, setup = measured
    if generation:
        print_generation(generation, setup)
    if idle:
        print_idle(idle)
    problems = idle_problems(idle)
    result = result_json(args, stack, model_dir, fd_limit)
    result["config"].update(setup)
    result |= {"generation": generation, "idle_streams": idle, "problems": problems}
    write_result(result, RESULTS_DIR / "streaming.json")
    for line in problems:
        print(f"!!! {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
