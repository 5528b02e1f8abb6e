"""`runworker`'s parent: keeps one worker process on the device and cleans up after
one that dies.

The worker process holds every job of its device at once (running in a batch, or
waiting for a slot), so when it dies, killed, out of memory, a CUDA crash or a step
past its hard limit, nothing inside it can report that. This parent, which never
touches the device, does: the jobs it was running fail `worker_lost`, refunded once
(`llmjobs.lifecycle`); the ones it held but had not started go back to the queue
at its head (Celery would redeliver them only after the visibility timeout); then a
new worker process starts, after a backoff when they keep dying.

While its worker process runs, it also sweeps for jobs lost anywhere (`llmjobs.reaper`:
every queue, whoever's; one supervisor per interval, across hosts): it is the one
process of each host that outlives its worker and never touches the device, so a
host whose worker is gone for good is still swept by the others. And it says in Redis
that it lives (`events.beat_supervisor`): a queue whose worker is down but supervised
is being restarted, one with neither died for good (the reaper then moves or fails
what waits for it).

A device name may have workers on several hosts, all on its one queue: each
supervisor cleans up after its own worker only (its name, `<queue>@<node>`), and
leaves the messages the others hold alone.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable

from django.db import close_old_connections

from djangollmapi.celery import app as celery_app
from djangollmapi.processes import die_with_parent
from djangollmapi.supervision import Backoff
from llmjobs import events, lifecycle, reaper
from llmjobs.models import Job
from llmjobs.runtime import WORKER_LOST_MESSAGE


def supervise(argv: list[str], worker: str, queue: str, say: Callable[[str], None]) -> int:
    """Run `argv` (the worker process `worker`) until told to stop; restart it whenever
    it dies."""
    stopping = False
    child: subprocess.Popen | None = None

    def forward(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff = Backoff()
    every = reaper.sweep_every_s(reaper.grace_s())
    try:
        while True:
            began = time.monotonic()
            say_alive(queue, worker, every * PRESENCE_SWEEPS)
            child = subprocess.Popen(argv, preexec_fn=die_with_parent)
            status = wait_sweeping(child, worker, queue, say, lambda: stopping)
            if stopping:
                return status
            failed, requeued = recover(worker, queue)
            delay = backoff.after(time.monotonic() - began)
            say(
                f"worker process for {queue} exited with status {status}: {failed} running job(s) failed,"
                f" {requeued} held message(s) back in the queue; restarting in {delay:g} s"
            )
            say_alive(queue, worker, delay + every * PRESENCE_SWEEPS)
            time.sleep(delay)
            if stopping:
                return status
    finally:
        with contextlib.suppress(Exception):
            events.clear_supervisor(queue, worker)


PRESENCE_SWEEPS = 3  # the supervisor's presence outlasts this many sweep intervals


def say_alive(queue: str, worker: str, ttl_s: float) -> None:
    """Tell the reaper this worker is supervised (restarted if it dies) for `ttl_s`."""
    with contextlib.suppress(Exception):  # Redis down: the next interval says it again
        events.beat_supervisor(queue, worker, ttl_s)


def wait_sweeping(
    child: subprocess.Popen, worker: str, queue: str, say: Callable[[str], None], stopping: Callable[[], bool]
) -> int:
    """Wait for the worker process to exit, sweeping for lost jobs meanwhile: in this
    thread, between waits (a thread beside `Popen`'s `preexec_fn` could deadlock the
    next fork). A sweep that fails is said once, not at every interval of an outage."""
    every = reaper.sweep_every_s(reaper.grace_s())
    failing = False
    while True:
        try:
            return child.wait(timeout=every)
        except subprocess.TimeoutExpired:
            if stopping():
                continue
        say_alive(queue, worker, every * PRESENCE_SWEEPS)
        try:
            close_old_connections()
            for outcome in reaper.sweep_if_due(worker):
                say(outcome.describe())
            failing = False
        except Exception as exc:  # the supervisor must outlive any sweep
            if not failing:
                say(f"sweeping for lost jobs failed ({type(exc).__name__}: {exc}); retrying every {every:g} s")
            failing = True
        finally:
            lifecycle.release_db_connection()


def recover(worker: str, queue: str) -> tuple[int, int]:
    """After the worker process `worker` died: fail what it ran, requeue what it held."""
    events.clear_heartbeat(queue, worker)
    failed = fail_running_jobs(worker)
    return failed, requeue_held_jobs(queue, worker)


def fail_running_jobs(worker: str) -> int:
    running = Job.objects.filter(status=Job.Status.RUNNING, worker=worker, backend="local").values_list("id", flat=True)
    return sum(
        lifecycle.fail_in_worker(str(job_id), "worker_lost", WORKER_LOST_MESSAGE, only_status=Job.Status.RUNNING)
        for job_id in list(running)
    )


def fail_unfinished_jobs(queues: list[str], message: str) -> int:
    """Fail (refunded) the local jobs of `queues` still queued or running, once no
    worker will ever end them: `serve` stopped its workers, and its embedded Redis,
    which holds their messages and events, goes next."""
    active = Job.objects.filter(status__in=Job.ACTIVE, backend="local", queue__in=queues).values_list("id", flat=True)
    return sum(lifecycle.fail(job_id, "server_stopped", message) for job_id in list(active))


def requeue_held_jobs(queue: str, worker: str) -> int:
    """Put the queue's unacknowledged messages that the dead process `worker` held back
    at the head of the queue (where the next worker takes them first), through kombu's
    own restore. Messages another live worker of the queue holds (on another host) are
    left alone: all the others are the dead one's (or another dead worker's). One the
    dead process had just taken, that a live worker takes too, runs once (its claim
    fails for the second); a message whose job already ended is dropped by the worker
    it comes back to."""
    others = {job_id for name, ids in events.held_jobs([queue])[queue].items() if name != worker for job_id in ids}
    restored = 0
    with celery_app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        for tag, raw in client.hgetall(channel.unacked_key).items():
            message, _exchange, routing_key = json.loads(raw)
            if routing_key == queue and reaper.message_job_id(message) not in others:
                # kombu's "leftmost" is the end its consumers take last
                channel.qos.restore_by_tag(tag, client=client, leftmost=False)
                restored += 1
    return restored
