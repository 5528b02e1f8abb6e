"""The bare Celery round trip `roundtrip.py` weighs `POST /api/` against (issue #13):
a no-op task sent and its result awaited, with nothing of ours in between.

The same broker as the stack (its Redis), the same pool as our device worker
(`--pool threads`, one thread), Celery's own Redis result backend, and the client's
`send_task(...).get()`: what any Celery application pays to hand a job to a worker and
hear back. The worker is this file run as a script (`python bench/celery_noop.py
REDIS_URL`), stopped with the stack; the client measures in the benchmark process.

The call sends a short text and gets it back (as Echo does), so the payload is not
nothing either.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

from celery import Celery
from cpu import CpuMeter, merged_meters
from loadgen import Outcome, Timing, merged
from report import case_summary, say
from stack import Stack, spawn_bare

# isort: split
# After `stack`, which puts the project root on sys.path.
from djangollmapi.config.loader import kombu_url

QUEUE = "dla.bench.noop"
TASK = "bench.noop"
READY_TIMEOUT_S = 60


def app_for(redis_url: str) -> Celery:
    """One Celery app for both ends: the stack's Redis as broker and result backend."""
    url = kombu_url(redis_url)
    app = Celery("bench_noop", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=300,
    )

    @app.task(name=TASK)
    def noop(text: str) -> str:
        return text

    return app


def start_worker(stack: Stack) -> None:
    """The no-op worker as the stack's child (stopped, and its CPU grouped, with it)."""
    argv = [sys.executable, str(Path(__file__).resolve()), stack.redis_url]
    log_path = stack.logs / "celery-noop.log"
    env = {**os.environ, **stack.env}
    stack.children.append(("celery noop", spawn_bare(argv, Path(__file__).parent, env, log_path)))
    app = app_for(stack.redis_url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        stack.check_children()
        try:
            if app.send_task(TASK, args=["ready?"], queue=QUEUE).get(timeout=2) == "ready?":
                return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError(f"the bare Celery no-op worker did not answer in {READY_TIMEOUT_S} s; see {log_path}")


class NoopProcesses:
    """The processes this case's CPU is counted over: the no-op worker and the Redis."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def cpu_groups(self) -> dict[str, list[int]]:
        groups = {"celery no-op worker": [p for p in [self.stack.pid("celery noop")] if p]}
        if self.stack.embedded_redis:
            groups["redis"] = [p for p in [self.stack.pid("redis")] if p]
        return groups


def measure(stack: Stack, n: int, warmup: int, text_chars: int) -> dict:
    """`n` round trips from one client, after `warmup`; CPU metered over the stack's
    processes and the no-op worker."""
    return summary([measure_once(stack, n, warmup, text_chars)])


def measure_once(stack: Stack, n: int, warmup: int, text_chars: int) -> tuple[Outcome, CpuMeter]:
    """One round of `measure` (roundtrip.py alternates rounds of it with ours)."""
    app = app_for(stack.redis_url)
    text = ("bare celery " + "x" * text_chars)[:text_chars]
    for _ in range(warmup):
        app.send_task(TASK, args=[text], queue=QUEUE).get(timeout=10)
    outcome = Outcome(attempted=n)
    clock = time.perf_counter
    with CpuMeter(NoopProcesses(stack)) as meter:
        started = clock()
        for i in range(n):
            mine = f"{text}{i}:{uuid.uuid4().hex[:6]}"
            t0 = clock()
            try:
                answer = app.send_task(TASK, args=[mine], queue=QUEUE).get(timeout=10)
            except Exception as exc:
                outcome.add_error(type(exc).__name__, str(exc)[:200])
                continue
            elapsed = clock() - t0
            if answer == mine:
                outcome.timings.append(Timing(elapsed))
            else:
                outcome.add_error("wrong result", repr(answer)[:200])
        outcome.wall_s = clock() - started
    app.close()
    return outcome, meter


def summary(rounds: list[tuple[Outcome, CpuMeter]]) -> dict:
    """The case of one or more rounds (`measure_once`), latencies pooled, CPU summed."""
    outcome = merged([run[0] for run in rounds])
    result = case_summary("bare Celery no-op round trip, 1 client", outcome)
    result |= merged_meters([run[1] for run in rounds]).report(len(outcome.timings))
    result["clients"], result["rounds"] = 1, len(rounds)
    say(f"bare Celery no-op: p50 {result['p50_ms']:.2f} ms, {result['errors']} errors")
    return result


def run_worker(redis_url: str) -> None:
    app = app_for(redis_url)
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            "--concurrency=1",
            "--loglevel=WARNING",
            f"--queues={QUEUE}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=noop-{uuid.uuid4().hex[:6]}@%h",
        ]
    )


if __name__ == "__main__":
    run_worker(sys.argv[1])
