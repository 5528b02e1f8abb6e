"""The Redis transport of jobs, and nothing else: each job's events in one stream,
`dla:job:<id>` (the worker appends `token`s, then `done` with the output or `error`;
a follower reads), its cancel flag, and what each device queue's workers say of
themselves. This is the only result channel; Celery has no result backend here. What
the events mean to a client is `llmjobs.follow`.

A device queue may have several workers (the same device name on several hosts), each
known by its name (`llmjobs.routing.worker_name`): each beats in its queue's heartbeat
hash and publishes its own state; readers take every live one into account, on Redis's
clock, in one round trip per call (`queue_states`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from django.conf import settings

from llmjobs.routing import QueueState, WorkerState, device_queue_name, local_node, worker_name

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
    """The queue's live workers: a hash, worker name -> when its heartbeat expires (ms,
    Redis's clock). The key lives while any of them beats."""
    return f"dla:worker:{queue}"


def device_state_key(queue: str, worker: str | None = None) -> str:
    """What one worker of the queue (this host's by default) holds
    (`publish_device_state`); it expires on its own."""
    return device_state_prefix(queue) + (worker or local_worker(queue))


def device_state_prefix(queue: str) -> str:
    return f"dla:held:{queue}:"


def routed_key(queue: str) -> str:
    """The jobs sent to the queue lately, scored by when (ms): those its workers have
    not published yet count towards its load (`queue_states`)."""
    return f"dla:routed:{queue}"


def supervisor_key(queue: str) -> str:
    """The queue's live supervisors, as `heartbeat_key` keeps its workers: a worker
    being restarted is still supervised, one whose host died is not."""
    return f"dla:supervisor:{queue}"


def local_worker(queue: str) -> str:
    """The name of this host's worker of `queue` (what `runworker` calls it here)."""
    return worker_name(queue, local_node())


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


# --- what the workers publish, and what the web tier reads of it -----------------------

# A worker's heartbeat in its queue's hash, on Redis's clock (so hosts need not agree on
# the time); the beats that expired are dropped, and the hash lives as long as the
# longest left. KEYS[1]: the hash; ARGV: the worker, ms until its beat expires.
BEAT = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', now + ttl))
local longest = ttl
local beats = redis.call('HGETALL', KEYS[1])
for i = 1, #beats, 2 do
  local left = tonumber(beats[i + 1]) - now
  if left <= 0 then redis.call('HDEL', KEYS[1], beats[i]) elseif left > longest then longest = left end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(longest))
"""

# A worker's state, stamped with when it was published (Redis's clock). KEYS[1]: its
# hash; ARGV: ms it stays valid, then field, value, ...
PUBLISH = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'published', string.format('%.0f', now), unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
"""

# A job sent to a queue, kept ARGV[2] ms. KEYS[1]: its routed set; ARGV[1]: the job.
ROUTED = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# Each queue's live workers and what they published, in one round trip: per queue
# (KEYS: its heartbeat hash, its list, its routed set), the messages in its list, the
# jobs sent to it since the oldest publication of its workers (less a margin: those in
# flight to them), and per live worker its name and the fields asked for. ARGV: the
# number of fields, the fields, the margin (ms), then each queue's state key prefix.
# The state keys are named here from the workers found (one Redis, not a cluster).
READ = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local nfields = tonumber(ARGV[1])
local fields = {'published'}
for i = 1, nfields do fields[#fields + 1] = ARGV[1 + i] end
local margin = tonumber(ARGV[2 + nfields])
local replies = {}
for q = 1, #KEYS / 3 do
  local beats = redis.call('HGETALL', KEYS[3 * q - 2])
  local prefix = ARGV[2 + nfields + q]
  local workers, oldest = {}, now
  for i = 1, #beats, 2 do
    if tonumber(beats[i + 1]) > now then
      local values = redis.call('HMGET', prefix .. beats[i], unpack(fields))
      local published = tonumber(values[1]) or 0
      if published < oldest then oldest = published end
      values[1] = beats[i]
      workers[#workers + 1] = values
    end
  end
  local pending = redis.call('ZCOUNT', KEYS[3 * q], oldest - margin, '+inf')
  replies[q] = {redis.call('LLEN', KEYS[3 * q - 1]), pending, workers}
end
return replies
"""

ROUTED_KEEP_MS = 10_000  # longer than a worker's state lives: a job is counted until it is
IN_FLIGHT_MS = 100  # sent this long before a worker published: maybe not in it yet
CALL_FIELDS = ("holding", "waiting", "models", "pace")  # what every call reads of a worker


def run_script(source: str, keys: Sequence[str], args: Sequence[Any], client: redis.Redis | None = None) -> Any:
    """Run a Lua script on `client` (the process's own by default); EVALSHA once the
    server has it."""
    client = client or redis_client()
    return _registered(client, source)(keys=list(keys), args=list(args), client=client)


_SCRIPTS: dict[str, Any] = {}


def _registered(client: redis.Redis, source: str) -> Any:
    """The script's handle (its SHA); it runs on whichever client it is given."""
    if source not in _SCRIPTS:
        _SCRIPTS[source] = client.register_script(source)
    return _SCRIPTS[source]


def beat(queue: str, ttl_s: float, worker: str | None = None) -> None:
    """`worker` (this host's worker of `queue` by default) serves the queue for `ttl_s`."""
    run_script(BEAT, [heartbeat_key(queue)], [worker or local_worker(queue), int(ttl_s * 1000)])


def clear_heartbeat(queue: str, worker: str | None = None) -> None:
    """`worker` (this host's by default) no longer serves the queue: its heartbeat and
    its state go; the queue's other workers stay."""
    worker = worker or local_worker(queue)
    redis_client().pipeline(transaction=False).hdel(heartbeat_key(queue), worker).delete(
        device_state_key(queue, worker)
    ).execute()


def publish_device_state(
    queue: str,
    waiting: int,
    models: dict,
    deployments: dict,
    ttl_s: float,
    held: Sequence[str] = (),
    worker: str | None = None,
) -> None:
    """What one worker of the device (this host's by default) holds, as a hash, so that
    each reader decodes only its part: `holding` and `waiting` (every job it holds, and
    those waiting for a slot: the queue's load for routing and its depth for
    backpressure), `models` (load states) and `pace` (per deployment, its slots and
    recent job time), all four read with every call; `deployments` (per deployment, the
    waiting jobs in the order they will run, how many run, how long a job takes lately:
    for positions and ETAs) and `held` (the id of every job the process holds, running
    or not: what `llmjobs.reaper` trusts a live worker to still end, whatever the broker
    lost). Stamped with when, on Redis's clock."""
    running = sum(d.get("running", 0) for d in deployments.values())
    pace = {name: {"max_batch": d.get("max_batch"), "job_s": d.get("job_s")} for name, d in deployments.items()}
    fields = {
        "holding": max(len(held), waiting + running),
        "waiting": waiting,
        "models": json.dumps(models),
        "pace": json.dumps(pace),
        "deployments": json.dumps(deployments),
        "held": json.dumps(list(held)),
    }
    args = [int(ttl_s * 1000)] + [item for pair in fields.items() for item in pair]
    run_script(PUBLISH, [device_state_key(queue, worker)], args)


def note_routed(queue: str, job_id: str) -> None:
    """A job was just sent to `queue`: it counts towards the queue's load until its
    worker publishes it (the next jobs see it at once, whoever sends them)."""
    run_script(ROUTED, [routed_key(queue)], [job_id, ROUTED_KEEP_MS])


def read_queues(
    queues: Sequence[str], fields: Sequence[str], client: redis.Redis | None = None
) -> list[tuple[int, int, dict[str, list[str | None]]]]:
    """Per queue, in one round trip: (messages in its list, jobs sent to it that its
    workers have not published yet, {live worker: its `fields`})."""
    if not queues:
        return []
    keys = [key for queue in queues for key in (heartbeat_key(queue), queue, routed_key(queue))]
    prefixes = [device_state_prefix(queue) for queue in queues]
    replies = run_script(READ, keys, [len(fields), *fields, IN_FLIGHT_MS, *prefixes], client)
    return [
        (int(listed), int(pending), {values[0]: list(values[1:]) for values in workers})
        for listed, pending, workers in replies
    ]


def queue_states(queues: Sequence[str]) -> list[QueueState]:
    """What each queue looks like to a call (`llmjobs.routing.QueueState`), all in one
    round trip: its live workers, its list, what was sent to it lately."""
    states = []
    for queue, (listed, pending, workers) in zip(queues, read_queues(queues, CALL_FIELDS), strict=True):
        seen = tuple(
            WorkerState(name, int(holding or 0), int(waiting or 0), loaded(models), loaded(pace))
            for name, (holding, waiting, models, pace) in sorted(workers.items())
        )
        states.append(QueueState(queue, seen, listed, pending))
    return states


def queue_state(queue: str) -> QueueState:
    return queue_states([queue])[0]


def worker_alive(device: str) -> bool:
    """Whether any worker serves the device's queue now (a fresh heartbeat)."""
    return queue_state(device_queue_name(device)).alive


def worker_deployments(queue: str) -> dict[str, dict[str, dict]]:
    """Per live worker of the queue, the `deployments` part of what it last published."""
    ((_listed, _pending, workers),) = read_queues([queue], ("deployments",))
    return {name: loaded(raw) for name, (raw,) in workers.items()}


def deployment_states(queue: str) -> dict[str, dict]:
    """The queue's deployments over all its live workers (`merge_deployments`)."""
    return merge_deployments(worker_deployments(queue).values())


def merge_deployments(per_worker: Iterable[dict[str, dict]]) -> dict[str, dict]:
    """Several workers' deployments as one device's: the waiting jobs of each in turn,
    the running ones and the slots summed, and the job time at which the slots together
    end jobs as fast as they do apart (None until one was measured)."""
    merged: dict[str, dict] = {}
    for deployments in per_worker:
        for name, state in deployments.items():
            entry = merged.setdefault(name, {"waiting": [], "running": 0, "max_batch": 0, "rate": 0.0})
            entry["waiting"] = entry["waiting"] + list(state.get("waiting", []))
            entry["running"] += state.get("running", 0)
            entry["max_batch"] += state.get("max_batch") or 1
            if state.get("job_s"):
                entry["rate"] += (state.get("max_batch") or 1) / state["job_s"]
    for entry in merged.values():
        rate = entry.pop("rate")
        entry["job_s"] = entry["max_batch"] / rate if rate else None
    return merged


def held_jobs(queues: Sequence[str], client: redis.Redis | None = None) -> dict[str, dict[str, set[str]]]:
    """Per queue, each live worker and the ids of the jobs it holds (running or not)."""
    return {
        queue: {name: set(loaded(raw) or ()) for name, (raw,) in workers.items()}
        for queue, (_listed, _pending, workers) in zip(queues, read_queues(queues, ("held",), client), strict=True)
    }


def beat_supervisor(queue: str, worker: str, ttl_s: float) -> None:
    """`worker`'s supervisor lives, for `ttl_s`: a worker it restarts comes back."""
    run_script(BEAT, [supervisor_key(queue)], [worker, int(ttl_s * 1000)])


def clear_supervisor(queue: str, worker: str) -> None:
    redis_client().hdel(supervisor_key(queue), worker)


def supervised_queues(queues: Sequence[str], client: redis.Redis | None = None) -> set[str]:
    """Of `queues`, those with a live supervisor (Redis's clock)."""
    client = client or redis_client()
    pipe = client.pipeline(transaction=False)
    pipe.time()
    for queue in queues:
        pipe.hvals(supervisor_key(queue))
    (seconds, micros), *values = pipe.execute()
    now_ms = seconds * 1000 + micros // 1000
    return {queue for queue, expiries in zip(queues, values, strict=True) if any(int(v) > now_ms for v in expiries)}


def loaded(raw: str | None) -> Any:
    """A published JSON field ({} when absent)."""
    return json.loads(raw) if raw else {}
