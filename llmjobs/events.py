"""Each job's events live in one Redis stream, `dla:job:<id>`: the worker appends
(`done` with the output, or `error`), the web process that waits reads. This is the
only result channel; Celery has no result backend here.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from django.conf import settings

STREAM_TTL_S = 3600
CANCEL_TTL_S = 3600
TERMINAL_EVENTS = ("done", "error")
READ_SLICE_MS = 5000


@functools.cache
def redis_client() -> redis.Redis:
    """One pooled client per process; short connect timeout so an outage is a quick 503."""
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=2,
        socket_timeout=(READ_SLICE_MS / 1000) + 5,
        health_check_interval=30,
        decode_responses=True,
    )


def stream_key(job_id: str) -> str:
    return f"dla:job:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"dla:job:{job_id}:cancel"


def heartbeat_key(queue: str) -> str:
    return f"dla:worker:{queue}"


def emit(job_id: str, event: str, **data: Any) -> None:
    """Append an event; the stream expires on its own an hour after the last one."""
    key = stream_key(job_id)
    pipe = redis_client().pipeline(transaction=False)
    pipe.xadd(key, {"event": event, "data": json.dumps(data)})
    pipe.expire(key, STREAM_TTL_S)
    pipe.execute()


def publish_token(job_id: str, text: str | None, first: bool = False) -> bool:
    """Append a `token` event (when `text` is given) and tell whether the job was
    cancelled, in one round trip. The stream's expiry is set with its first event."""
    pipe = redis_client().pipeline(transaction=False)
    if text is not None:
        key = stream_key(job_id)
        pipe.xadd(key, {"event": "token", "data": json.dumps({"text": text})})
        if first:
            pipe.expire(key, STREAM_TTL_S)
    pipe.exists(cancel_key(job_id))
    return bool(pipe.execute()[-1])


def read_events(job_id: str, after: str, block_ms: int) -> list[tuple[str, str, dict[str, Any]]]:
    """Events after id `after` as (id, event, data), waiting up to `block_ms` for the
    first one; [] when none came."""
    reply = redis_client().xread({stream_key(job_id): after}, block=max(1, block_ms))
    return [
        (entry_id, fields.get("event", ""), json.loads(fields.get("data", "{}")))
        for _stream, entries in reply or ()
        for entry_id, fields in entries
    ]


FOLLOW_SLICE_MS = 1000


def follow(
    job_id: str, timeout_s: float, client_gone: Callable[[], bool], idle_s: float = 15.0
) -> Iterator[tuple[str, dict[str, Any]]]:
    """A job's events as they come, for a streaming response: ("token", {"text"}) with
    every token that arrived together merged into one, then the terminal ("done" |
    "error", data). ("idle", {}) after `idle_s` without events, so the caller can send
    a keep-alive; ("gone", {}) when the client has disconnected; ("timeout", {}) at
    the deadline. Reads in short slices so a disconnect is seen even while queued."""
    deadline = time.monotonic() + timeout_s
    last_id, quiet_since = "0-0", time.monotonic()
    while (remaining := deadline - time.monotonic()) > 0:
        if client_gone():
            yield "gone", {}
            return
        entries = read_events(job_id, last_id, min(int(remaining * 1000), FOLLOW_SLICE_MS))
        if not entries:
            if time.monotonic() - quiet_since >= idle_s:
                quiet_since = time.monotonic()
                yield "idle", {}
            continue
        quiet_since = time.monotonic()
        last_id = entries[-1][0]
        pieces = []
        for _entry_id, event, data in entries:
            if event == "token":
                pieces.append(data.get("text", ""))
            elif event in TERMINAL_EVENTS:
                if pieces:
                    yield "token", {"text": "".join(pieces)}
                yield event, data
                return
        if pieces:
            yield "token", {"text": "".join(pieces)}
    yield "timeout", {}


def wait_for_terminal_event(job_id: str, timeout_s: float) -> dict[str, Any] | None:
    """Block until the job's `done` or `error` event, or None after `timeout_s`.
    Reads in slices so a dead connection surfaces instead of blocking forever."""
    deadline = time.monotonic() + timeout_s
    last_id = "0-0"
    client = redis_client()
    while (remaining := deadline - time.monotonic()) > 0:
        block_ms = max(1, min(int(remaining * 1000), READ_SLICE_MS))
        reply = client.xread({stream_key(job_id): last_id}, block=block_ms)
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                last_id = entry_id
                if fields.get("event") in TERMINAL_EVENTS:
                    return {"event": fields["event"], **json.loads(fields.get("data", "{}"))}
    return None


def terminal_event(job_id: str) -> dict[str, Any] | None:
    """The job's terminal event if it has one already (no waiting)."""
    for _entry_id, fields in reversed(redis_client().xrange(stream_key(job_id))):
        if fields.get("event") in TERMINAL_EVENTS:
            return {"event": fields["event"], **json.loads(fields.get("data", "{}"))}
    return None


def request_cancel(job_id: str) -> None:
    redis_client().set(cancel_key(job_id), "1", ex=CANCEL_TTL_S)


def is_cancelled(job_id: str) -> bool:
    return bool(redis_client().exists(cancel_key(job_id)))


def queue_state(queue: str) -> tuple[bool, int]:
    """(a worker is alive on the queue, messages waiting in it) in one round trip.
    Celery's Redis transport keeps a queue as a list named after it."""
    pipe = redis_client().pipeline(transaction=False)
    pipe.exists(heartbeat_key(queue))
    pipe.llen(queue)
    alive, depth = pipe.execute()
    return bool(alive), int(depth)


def beat(queue: str, ttl_s: float) -> None:
    redis_client().set(heartbeat_key(queue), str(time.time()), px=int(ttl_s * 1000))


def clear_heartbeat(queue: str) -> None:
    redis_client().delete(heartbeat_key(queue))
