"""Following a job: its events as typed values, and every race of its ending settled
in one place.

`follow_job` yields `Token`s as the worker makes them (when it streams), `Idle` when
nothing came for a while (the caller may send a keep-alive), and exactly one final
`Done` or `Failed`, unless its client goes away first. Whoever ends a job first wins
(the worker, a time limit, this follower giving up, Redis failing under it); when the
follower loses such a race it reports what was recorded, so a client is never charged
for an error nor refunded for an answer. A follow abandoned before its end (the client
left, or its consumer stopped reading) cancels the job; one that fails raises and
leaves the job to its caller (a stream fails and refunds it).

A plain answer takes the last event (`wait_for_output`); an SSE stream formats each.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from djangollmapi import draining
from djangollmapi.errors import BROKER_UNAVAILABLE, ApiError
from llmjobs import events, lifecycle
from llmjobs.models import Job

log = logging.getLogger(__name__)

PLAIN_READ_SLICE_MS = 5000  # a dead connection surfaces within this, not never
STREAM_READ_SLICE_MS = 1000  # a client that left is seen within this, even while queued
IDLE_S = 15.0
WAITING_IDLE_S = 2.0  # before the first event: how often a stream hears it still waits
ERROR_STATUS = {
    "job_timeout": 504,
    "broker_unavailable": 503,
    "no_worker": 503,
    "model_unavailable": 503,
    "unsupported_operation": 400,
    "cancelled": 409,
    "server_stopping": 503,
}
SERVER_STOPPING = "The server is restarting and could not wait for this job; it was stopped, and not charged. Retry."


@dataclass(frozen=True)
class Token:
    text: str  # every piece that arrived together, joined


@dataclass(frozen=True)
class Idle:
    """Nothing happened for a while. `waiting`: nothing at all yet (the job may still
    be queued), so a stream can tell its client where it stands."""

    waiting: bool = False


@dataclass(frozen=True)
class Done:
    output: Any


@dataclass(frozen=True)
class Failed:
    error: ApiError


JobEvent = Token | Idle | Done | Failed


def follow_job(job: Job, timeout_s: float, client_gone: Callable[[], bool] | None = None) -> Iterator[JobEvent]:
    """The job's events until it ends, for at most `timeout_s`; `client_gone` (for a
    stream) is asked between reads, and a `True` ends the follow and cancels the job."""
    lifecycle.release_db_connection()
    ended = False
    try:
        for event in job_events(job, timeout_s, client_gone):
            ended = isinstance(event, Done | Failed)
            yield event
            if ended:
                return
        if client_gone is None or not client_gone():
            ended = True
            yield stop_waiting(job) if draining.draining() else give_up(job, timeout_s)
        else:
            log.info("client of job %s went away; cancelling", job.id)
    except redis.RedisError:
        ended = True
        yield broker_lost(job)
    except Exception:
        ended = True  # not abandoned but a fault: its caller fails the job (a stream) or answers 500
        raise
    finally:
        if not ended:
            with contextlib.suppress(Exception):
                lifecycle.cancel(job.id)


def job_events(job: Job, timeout_s: float, client_gone: Callable[[], bool] | None) -> Iterator[JobEvent]:
    """What the job's Redis stream says, read in slices until its terminal event, the
    deadline, or the client's leaving (then it just stops)."""
    slice_ms = PLAIN_READ_SLICE_MS if client_gone is None else STREAM_READ_SLICE_MS
    deadline = time.monotonic() + timeout_s
    last_id, quiet_since = "0-0", time.monotonic()
    while (remaining := min(deadline, draining.stop_at() or deadline) - time.monotonic()) > 0:
        if client_gone is not None and client_gone():
            return
        entries = events.read_events(str(job.id), last_id, min(int(remaining * 1000), slice_ms))
        if not entries:
            waiting = last_id == "0-0"
            if client_gone is not None and time.monotonic() - quiet_since >= (WAITING_IDLE_S if waiting else IDLE_S):
                quiet_since = time.monotonic()
                yield Idle(waiting)
            continue
        quiet_since, last_id = time.monotonic(), entries[-1][0]
        pieces, ending = [], None
        for _id, event, data in entries:
            if event == "token":
                pieces.append(data.get("text", ""))
            elif event in events.TERMINAL_EVENTS:
                ending = terminal(job, event, data)
        if pieces:
            yield Token("".join(pieces))
        if ending is not None:
            yield ending
            return


def terminal(job: Job, event: str, data: dict[str, Any]) -> Done | Failed:
    if event == "done":
        return Done(data["output"])
    return Failed(job_error(data.get("code", "job_failed"), data.get("message", ""), job.id))


def give_up(job: Job, timeout_s: float) -> Done | Failed:
    """The wait is over: time the job out (504), unless it ended meanwhile, in which
    case its recorded outcome is the answer."""
    if lifecycle.time_out(job.id):
        return Failed(ApiError(504, "job_timeout", f"The model did not answer within {timeout_s:g} s."))
    return recorded_ending(job)


def stop_waiting(job: Job) -> Done | Failed:
    """The web process is stopping (djangollmapi.draining): fail, refund and stop the
    job (503, retry elsewhere), unless it ended meanwhile."""
    failed = lifecycle.fail(job.id, "server_stopping", "The web server stopped before the job ended.")
    with contextlib.suppress(redis.RedisError):
        events.request_cancel(str(job.id))
    if failed:
        return Failed(ApiError(503, "server_stopping", SERVER_STOPPING, headers={"Retry-After": "1"}))
    return recorded_ending(job)


def broker_lost(job: Job) -> Done | Failed:
    """Redis failed under the follower: fail and refund the job (503), unless it ended
    meanwhile."""
    if lifecycle.fail(job.id, "broker_unavailable", "The job queue became unavailable."):
        return Failed(ApiError(503, "broker_unavailable", BROKER_UNAVAILABLE))
    return recorded_ending(job)


def recorded_ending(job: Job) -> Done | Failed:
    """What an ended job left: its terminal event if Redis still has it, else its row."""
    with contextlib.suppress(redis.RedisError):
        found = events.terminal_event(str(job.id))
        if found is not None and found[0] == "done":
            return terminal(job, *found)
    row = Job.objects.get(id=job.id)
    if row.status == Job.Status.SUCCEEDED and row.output is not None:
        return Done(row.output)
    return Failed(job_error(row.error_code or "job_failed", row.error_message, job.id))


def job_error(code: str, message: str, job_id: Any) -> ApiError:
    """A job's failure as its client sees it, with the job id to quote."""
    if code == "job_time_limit":  # the worker's deadline and ours read the same to a client
        code, message = "job_timeout", "The model did not answer in time."
    param = "model" if code == "unsupported_operation" else None
    return ApiError(ERROR_STATUS.get(code, 500), code, f"{message or 'The job failed.'} (job {job_id})", param=param)


def wait_for_output(job: Job, timeout_s: float) -> Any:
    """The job's output, or the ApiError that says why there is none: the last event
    of a follow that no client can leave."""
    for event in follow_job(job, timeout_s):
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Done):
            return event.output
    raise RuntimeError(f"the follow of job {job.id} ended without an outcome")
