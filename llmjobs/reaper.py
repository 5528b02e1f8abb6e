"""The reaper: ends the local jobs that the broker or their worker lost, so that none
stays `queued` or `running`, unrefunded, forever.

A job is lost when it is nowhere: no message of it in its queue (Celery's Redis lists,
one per priority step) nor unacknowledged (kombu's `unacked` hash), and not among the
jobs a live worker publishes as held (`llmjobs.device`, four times a second). That is
what is left when Redis restarts empty (the lists and the hash are gone), when a host
dies with its supervisor (nobody is left to fail what it ran), or when a worker's last
write of a job is lost. A `running` job is only held by a live worker: its message in
the unacked hash of a queue that no worker beats for is not running anywhere.

One look proves nothing: a message moves from its list to the unacked hash in two
commands, a restored one back, and a worker publishes what it holds every 0.25 s. So a
job is ended only once every sweep has missed it for `[server] reap_after_s` (when
each job was first missed is kept in Redis, on Redis's clock, so that sweepers on
other hosts agree), and only if it is older than that. It then fails through the
lifecycle, refunded: `worker_lost` when its queue has no live worker any more,
`job_lost` otherwise; the conditional ending makes that once-only whoever else ends
the job meanwhile. When Redis cannot be read, nothing is ended: its silence is not
evidence. A sweep reads the database once (the queue, status and created_at index),
and the broker's messages only for the jobs no worker holds, in Redis (a script that
sends back ids, not prompts: ~15 ms of Redis for 1,000 queued messages of 2 KB).

Who sweeps: every `runworker` supervisor (`llmjobs.supervisor`), which never touches a
device and outlives its worker process, asks every few seconds; a `SET NX PX` lock in
Redis lets one of them sweep all the queues per interval. So a host whose worker died
for good is reaped by a live one elsewhere, and N hosts cost one sweep. `manage.py
reapjobs` is the operator's sweep, for when no worker runs at all.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from django.conf import settings
from django.utils import timezone
from kombu.transport.redis import Channel

from djangollmapi.celery import app as celery_app
from llmjobs import events, lifecycle
from llmjobs.models import Job
from llmjobs.routing import device_queue_name
from llmjobs.runtime import WORKER_LOST_MESSAGE

JOB_LOST = "job_lost"
JOB_LOST_MESSAGE = (
    "The job was lost: neither its queue nor a worker held it any more (the broker lost its message, "
    "or its worker its ending); it did not complete."
)
WORKER_LOST = "worker_lost"
LOCK_KEY = "dla:reaper:lock"
UNSEEN_KEY = "dla:reaper:unseen"  # job id -> when a sweep first missed it (Redis's clock)
UNSEEN_TTL_S = 3600  # forgotten if no sweeper runs for this long: the counts start again
MIN_SWEEP_EVERY_S = 0.5
MAX_SWEEP_EVERY_S = 5.0

# Which of the job ids in ARGV have a message in the broker: in the unacked hash
# (KEYS[1], each value `[message, exchange, routing key]`) or in a queue's lists
# (KEYS[2..]). Run in Redis, so that only ids come back, not every prompt in the queue.
# A message that cannot be decoded counts for each wanted id it contains: seen is the
# safe side.
FIND_IN_BROKER = """
local wanted, found = {}, {}
for i = 1, #ARGV do wanted[ARGV[i]] = true end
local function look(raw, unacked)
  local ok, decoded = pcall(cjson.decode, raw)
  local message = nil
  if ok and type(decoded) == 'table' then
    if unacked then message = decoded[1] else message = decoded end
  end
  if type(message) == 'table' and type(message.headers) == 'table' and type(message.headers.id) == 'string' then
    if wanted[message.headers.id] then found[message.headers.id] = true end
    return
  end
  for id in pairs(wanted) do
    if string.find(raw, id, 1, true) then found[id] = true end
  end
end
for _, raw in ipairs(redis.call('HVALS', KEYS[1])) do look(raw, true) end
for i = 2, #KEYS do
  for _, raw in ipairs(redis.call('LRANGE', KEYS[i], 0, -1)) do look(raw, false) end
end
local ids = {}
for id in pairs(found) do ids[#ids + 1] = id end
return ids
"""


@dataclass(frozen=True)
class ActiveJob:
    """A local job the database says is still queued or running."""

    id: str
    status: str
    queue: str
    model: str


@dataclass(frozen=True)
class Sightings:
    """Where one sweep found jobs: with a message in the broker (a queue's lists or the
    unacked hash), held by a worker process (what it publishes), and which queues
    have a live worker (a fresh heartbeat)."""

    in_broker: frozenset[str] = frozenset()
    held: frozenset[str] = frozenset()
    alive_queues: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Lost:
    job: ActiveJob
    code: str
    message: str


@dataclass(frozen=True)
class Verdict:
    """One sweep's judgement: the jobs seen again (their count is dropped), the ones
    missed for the first time (their count starts), and the ones missed too long."""

    seen_again: list[str]
    newly_unseen: list[str]
    lost: list[Lost]


# --- the decision, pure ------------------------------------------------------------


def is_seen(job: ActiveJob, sightings: Sightings) -> bool:
    """Whether someone will still end the job: a worker process that holds it, or, for
    a queued job, its message in the broker (a worker will take it); for a running job
    only while its queue has a live worker (a message a dead worker held is running
    nowhere; a live one drops a job it no longer runs as `worker_lost`)."""
    if job.id in sightings.held:
        return True
    if job.id not in sightings.in_broker:
        return False
    return job.status == Job.Status.QUEUED or job.queue in sightings.alive_queues


def lost_reason(job: ActiveJob, sightings: Sightings) -> tuple[str, str]:
    """`worker_lost` for a running job whose queue has no live worker (it died for
    good, host and all); `job_lost` for the rest: the broker lost the message, or the
    live worker no longer runs it."""
    if job.status == Job.Status.RUNNING and job.queue not in sightings.alive_queues:
        return WORKER_LOST, WORKER_LOST_MESSAGE
    return JOB_LOST, JOB_LOST_MESSAGE


def judge(
    jobs: Iterable[ActiveJob], sightings: Sightings, unseen_since: dict[str, float], now: float, grace_s: float
) -> Verdict:
    """Which jobs are lost: those missed by every sweep for `grace_s` (`unseen_since`:
    when a sweep first missed each, `now` on the same clock)."""
    seen_again, newly_unseen, lost = [], [], []
    for job in jobs:
        if is_seen(job, sightings):
            if job.id in unseen_since:
                seen_again.append(job.id)
        elif job.id not in unseen_since:
            newly_unseen.append(job.id)
        elif now - unseen_since[job.id] >= grace_s:
            lost.append(Lost(job, *lost_reason(job, sightings)))
    return Verdict(seen_again, newly_unseen, lost)


def sweep_every_s(grace_s: float) -> float:
    """How often the supervisors sweep: several times per grace, so that a lost job ends
    soon after it, at most every 5 s (each sweep reads the database once)."""
    return min(MAX_SWEEP_EVERY_S, max(MIN_SWEEP_EVERY_S, grace_s / 6))


def grace_s() -> float:
    return settings.LLM_CONFIG.server.reap_after_s


def configured_queues() -> list[str]:
    """Every device queue of the config: each sweeper sweeps them all, not only its own."""
    return [device_queue_name(device) for device in settings.LLM_CONFIG.devices]


# --- what the database and Redis say ------------------------------------------------


def active_local_jobs(queues: Sequence[str], created_before: datetime) -> list[ActiveJob]:
    """The local jobs of `queues` still queued or running that were created before
    `created_before`: a younger one may be between its row and its message."""
    rows = (
        Job.objects.filter(queue__in=list(queues), status__in=Job.ACTIVE, created_at__lt=created_before)
        .filter(backend="local")
        .order_by()
        .values_list("id", "status", "queue", "model")
    )
    return [ActiveJob(str(job_id), status, queue, model) for job_id, status, queue, model in rows]


def broker_keys(queues: Iterable[str]) -> list[str]:
    """The unacked hash, then every Redis list of `queues` (one per priority step), as
    kombu's Redis transport names them with this app's transport options."""
    options = celery_app.conf.broker_transport_options or {}
    prefix = options.get("global_keyprefix", "")
    steps = options.get("priority_steps", Channel.priority_steps)
    sep = options.get("sep", Channel.sep)
    lists = [f"{queue}{sep}{step}" if step else queue for queue in queues for step in steps]
    return [prefix + key for key in [options.get("unacked_key", Channel.unacked_key), *lists]]


def read_sightings(client: redis.Redis, jobs: Sequence[ActiveJob]) -> Sightings:
    """Where `jobs` are, in two round trips: the heartbeats and what the queues'
    workers hold, then the broker's messages of the jobs no worker holds (none read
    when every job is held)."""
    queues = sorted({job.queue for job in jobs})
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.exists(events.heartbeat_key(queue))
        pipe.hget(events.device_state_key(queue), "held")
    replies = pipe.execute()
    alive = frozenset(queue for queue, beat in zip(queues, replies[0::2], strict=True) if beat)
    held = frozenset(job_id for raw in replies[1::2] if raw for job_id in json.loads(raw))
    wanted = [job for job in jobs if job.id not in held and (job.status == Job.Status.QUEUED or job.queue in alive)]
    in_broker: frozenset[str] = frozenset()
    if wanted:
        keys = broker_keys(sorted({job.queue for job in wanted}))
        find = client.register_script(FIND_IN_BROKER)  # EVALSHA: the script is sent once
        in_broker = frozenset(find(keys=keys, args=[job.id for job in wanted], client=client))
    return Sightings(in_broker=in_broker, held=held, alive_queues=alive)


def redis_now(client: redis.Redis) -> float:
    """Redis's clock: the one all sweepers, on any host, count unseen time by."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def ended_jobs(job_ids: Iterable[str]) -> list[str]:
    """Of `job_ids`, those no longer active (ended, or gone from the table)."""
    job_ids = list(job_ids)
    if not job_ids:
        return []
    still = Job.objects.filter(id__in=job_ids, status__in=Job.ACTIVE).values_list("id", flat=True)
    active = {str(job_id) for job_id in still}
    return [job_id for job_id in job_ids if job_id not in active]


# --- the sweep -----------------------------------------------------------------------


def sweep(
    grace: float | None = None, queues: Sequence[str] | None = None, client: redis.Redis | None = None
) -> list[Lost]:
    """One look at every active job of `queues` (default: all the config's) older than
    `grace` (default `[server] reap_after_s`): count how long each has been missed and
    end, failed and refunded, those missed for `grace`. The ones ended. Raises
    `redis.RedisError` when Redis cannot be read, having ended nothing."""
    grace = grace_s() if grace is None else grace
    client = client or events.redis_client()
    queues = configured_queues() if queues is None else list(queues)
    jobs = active_local_jobs(queues, timezone.now() - timedelta(seconds=grace))
    unseen_since = {job_id: float(at) for job_id, at in client.hgetall(UNSEEN_KEY).items()}
    if not jobs and not unseen_since:
        return []
    sightings = read_sightings(client, jobs) if jobs else Sightings()
    now = redis_now(client)
    verdict = judge(jobs, sightings, unseen_since, now, grace)
    candidates = {job.id for job in jobs}
    forgotten = [*verdict.seen_again, *ended_jobs(job_id for job_id in unseen_since if job_id not in candidates)]
    note_unseen(client, verdict.newly_unseen, now, forgotten)
    ended = [lost for lost in verdict.lost if end_lost(lost)]
    if verdict.lost:
        with contextlib.suppress(redis.RedisError):  # else a later sweep finds them ended
            note_unseen(client, [], now, [lost.job.id for lost in verdict.lost])
    return ended


def note_unseen(client: redis.Redis, newly_unseen: Sequence[str], now: float, forgotten: Sequence[str]) -> None:
    """Start the count of the jobs missed for the first time (HSETNX: a concurrent
    sweeper's earlier start stands) and drop that of the jobs seen again or ended."""
    if not newly_unseen and not forgotten:
        return
    pipe = client.pipeline(transaction=False)
    if forgotten:
        pipe.hdel(UNSEEN_KEY, *forgotten)
    for job_id in newly_unseen:
        pipe.hsetnx(UNSEEN_KEY, job_id, repr(now))
    pipe.expire(UNSEEN_KEY, UNSEEN_TTL_S)
    pipe.execute()


def end_lost(lost: Lost) -> bool:
    """Fail and refund a lost job through the lifecycle, only in the status it was
    judged in, and tell its follower; False when it ended meanwhile. Redis failing
    after the ending committed loses only the follower's event."""
    try:
        ended = lifecycle.fail_in_worker(lost.job.id, lost.code, lost.message, only_status=lost.job.status)
    except redis.RedisError:
        ended = Job.objects.filter(id=lost.job.id, status=Job.Status.FAILED, error_code=lost.code).exists()
    return ended


def sweep_if_due(owner: str, client: redis.Redis | None = None) -> list[Lost]:
    """A supervisor's periodic sweep: only when no sweeper anywhere swept this interval
    (the lock expires after it, never released early), so N hosts cost one sweep."""
    client = client or events.redis_client()
    every = sweep_every_s(grace_s())
    if not client.set(LOCK_KEY, owner, nx=True, px=int(every * 1000)):
        return []
    return sweep(client=client)
