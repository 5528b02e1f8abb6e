"""The Redis transport of jobs, and nothing else: each job's events in one stream,
`dla:job:<id>` (the worker appends `token`s, then `done` with the output or `error`;
a follower reads), its cancel flag, and each device queue's worker heartbeat. This is
the only result channel; Celery has no result backend here. What the events mean to a
client is `llmjobs.follow`.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from django.conf import settings

from llmjobs.routing import device_queue_name

STREAM_TTL_S = 3600
CANCEL_TTL_S = 3600
TERMINAL_EVENTS = ("done", "error")
MAX_BLOCK_MS = 5000
BLOCK_MARGIN_S = 1.0  # a blocking read's socket timeout beyond its block time


@functools.cache
def redis_client(blocking: bool = False) -> redis.Redis:
    """One pooled client per process. Its socket timeouts make a Redis that is down or
    frozen fail a call within `REDIS_SOCKET_TIMEOUT_S` (a quick 503), never a hang.
    `blocking` is its twin for the reads that wait on a job's stream (XREAD BLOCK, at
    most MAX_BLOCK_MS): the same server, a socket timeout that outlasts the longest
    block. A connection broken by a restarted Redis is replaced when next taken."""
    if blocking:
        pool = redis_client().connection_pool
        kwargs = {**pool.connection_kwargs, "socket_timeout": MAX_BLOCK_MS / 1000 + BLOCK_MARGIN_S}
        return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
    timeout_s = settings.REDIS_SOCKET_TIMEOUT_S
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        health_check_interval=30,
        decode_responses=True,
    )


def stream_key(job_id: str) -> str:
    return f"dla:job:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"dla:job:{job_id}:cancel"


def heartbeat_key(queue: str) -> str:
    return f"dla:worker:{queue}"


def device_state_key(queue: str) -> str:
    return f"dla:held:{queue}"


def emit(job_id: str, event: str, **data: Any) -> None:
    """Append an event; the stream expires on its own an hour after the last one."""
    key = stream_key(job_id)
    pipe = redis_client().pipeline(transaction=False)
    pipe.xadd(key, {"event": event, "data": json.dumps(data)})
    pipe.expire(key, STREAM_TTL_S)
    pipe.execute()


def publish_step(pieces: list[tuple[str, str | None, bool]], jobs: list[str]) -> set[str]:
    """Generated pieces in one round trip: append each `(job id, text, first)` piece
    (text None: nothing to stream; the stream's expiry is set with its first event)
    and tell which of `jobs` were cancelled meanwhile. A batch sends a whole decode
    step at once, instead of one round trip per job and token."""
    pipe = redis_client().pipeline(transaction=False)
    for job_id, text, first in pieces:
        if text is not None:
            key = stream_key(job_id)
            pipe.xadd(key, {"event": "token", "data": json.dumps({"text": text})})
            if first:
                pipe.expire(key, STREAM_TTL_S)
    for job_id in jobs:
        pipe.exists(cancel_key(job_id))
    results = pipe.execute()
    flags = results[len(results) - len(jobs) :] if jobs else []
    return {job_id for job_id, flag in zip(jobs, flags, strict=True) if flag}


def decoded(fields: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """One stream entry as (event, data)."""
    return fields.get("event", ""), json.loads(fields.get("data", "{}"))


def read_events(job_id: str, after: str, block_ms: int) -> list[tuple[str, str, dict[str, Any]]]:
    """Events after entry id `after` as (id, event, data), waiting up to `block_ms`
    (at most MAX_BLOCK_MS) for the first one; [] when none came."""
    block_ms = max(1, min(block_ms, MAX_BLOCK_MS))
    reply = redis_client(blocking=True).xread({stream_key(job_id): after}, block=block_ms)
    return [(entry_id, *decoded(fields)) for _stream, entries in reply or () for entry_id, fields in entries]


def terminal_event(job_id: str) -> tuple[str, dict[str, Any]] | None:
    """The job's terminal (event, data) if it has one already (no waiting)."""
    for _entry_id, fields in reversed(redis_client().xrange(stream_key(job_id))):
        event, data = decoded(fields)
        if event in TERMINAL_EVENTS:
            return event, data
    return None


def request_cancel(job_id: str) -> None:
    redis_client().set(cancel_key(job_id), "1", ex=CANCEL_TTL_S)


def is_cancelled(job_id: str) -> bool:
    return bool(redis_client().exists(cancel_key(job_id)))


@dataclass(frozen=True)
class QueueState:
    """A device queue as the web tier sees it: whether a worker serves it, how many jobs
    wait for it, and its deployments' model load states (`loaded`, `failed` with the
    reason, `not_loaded`), as its worker last published them."""

    alive: bool
    depth: int
    models: dict[str, dict[str, Any]]


def queue_state(queue: str) -> QueueState:
    """The queue's state in one round trip: the heartbeat, the messages still in the
    queue (Celery's Redis transport keeps it as a list named after it) and what its
    worker published (the jobs it holds waiting for a slot, its models)."""
    pipe = redis_client().pipeline(transaction=False)
    pipe.exists(heartbeat_key(queue))
    pipe.llen(queue)
    pipe.hmget(device_state_key(queue), "waiting", "models")
    alive, listed, (waiting, models) = pipe.execute()
    return QueueState(bool(alive), int(listed) + int(waiting or 0), json.loads(models) if models else {})


def worker_alive(device: str) -> bool:
    """Whether a worker serves the device's queue now (its heartbeat is fresh)."""
    return queue_state(device_queue_name(device)).alive


def beat(queue: str, ttl_s: float) -> None:
    redis_client().set(heartbeat_key(queue), str(time.time()), px=int(ttl_s * 1000))


def clear_heartbeat(queue: str) -> None:
    redis_client().delete(heartbeat_key(queue), device_state_key(queue))


def publish_device_state(
    queue: str, waiting: int, models: dict, deployments: dict, ttl_s: float, held: Sequence[str] = ()
) -> None:
    """What the device's worker holds, as a hash of four fields so that each reader
    decodes only its part: `waiting` (jobs waiting for a slot: the queue's depth for
    backpressure, read with every call), `models` (load states, read with every call),
    `deployments` (per deployment, the waiting jobs in the order they will run, how
    many run, how long a job takes lately: for positions and ETAs) and `held` (the id
    of every job the process holds, running or not: what `llmjobs.reaper` trusts a
    live worker to still end, whatever the broker lost)."""
    key = device_state_key(queue)
    fields = {
        "waiting": waiting,
        "models": json.dumps(models),
        "deployments": json.dumps(deployments),
        "held": json.dumps(list(held)),
    }
    redis_client().pipeline(transaction=False).hset(key, mapping=fields).pexpire(key, int(ttl_s * 1000)).execute()


def deployment_states(queue: str) -> dict[str, dict]:
    """The `deployments` part of what the queue's worker last published ({} if none)."""
    raw = redis_client().hget(device_state_key(queue), "deployments")
    return json.loads(raw) if raw else {}
