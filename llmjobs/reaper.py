"""The reaper: ends the local jobs that the broker or their worker lost, so that none
stays `queued` or `running`, unrefunded, forever.

A job is lost when it is nowhere: no message of it in its queue (Celery's Redis lists,
one per priority step) nor unacknowledged (kombu's `unacked` hash), and not among the
jobs a live worker publishes as held (`llmjobs.device`, four times a second). That is
what is left when Redis restarts empty (the lists and the hash are gone), when a host
dies with its supervisor (nobody is left to fail what it ran), or when a worker's last
write of a job is lost. A `running` job is only held by a live worker: its message in
the unacked hash of a queue that no worker beats for is not running anywhere.

A queued job can also be stranded: its message in the list of a queue no worker
serves, or unacknowledged with no live worker holding it (its worker's host died with
its supervisor, or its supervisor could not restore it). Once every sweep has seen it
so for the grace, its message is moved (atomically, addressed to its new queue) to the
queue of a live replica of its deployment with the shortest expected wait
(`llmjobs.routing`), or back to its own queue's head when that one has a live worker
(or is supervised: its worker is being restarted). With nowhere to go it fails
`job_lost`, refunded. A stranded job waits for its own worker, untouched, while that
worker's supervisor lives and no replica could take it.

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

import bisect
import contextlib
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from django.conf import settings
from django.utils import timezone
from kombu.transport.redis import Channel

from djangollmapi.celery import app as celery_app
from llmjobs import events, lifecycle
from llmjobs.models import Job
from llmjobs.routing import choose_replica, device_queue_name
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

# Where the job ids in ARGV have a message in the broker: in the unacked hash (KEYS[1],
# each value `[message, exchange, routing key]`) or in a queue's lists (KEYS[2..]). Run
# in Redis, so that only ids come back, not every prompt in the queue: pairs of the id
# and where (`unacked`, its delivery tag; `listed`, the list's key). A message that
# cannot be decoded counts for each wanted id it contains, as `text` (seen, not
# movable): the safe side.
FIND_IN_BROKER = """
local wanted, found = {}, {}
for i = 1, #ARGV do wanted[ARGV[i]] = true end
local function look(raw, kind, where)
  local ok, decoded = pcall(cjson.decode, raw)
  local message = nil
  if ok and type(decoded) == 'table' then
    if kind == 'unacked' then message = decoded[1] else message = decoded end
  end
  if type(message) == 'table' and type(message.headers) == 'table' and type(message.headers.id) == 'string' then
    local id = message.headers.id
    if wanted[id] and not found[id] then found[id] = {kind, where} end
    return
  end
  for id in pairs(wanted) do
    if string.find(raw, id, 1, true) then found[id] = {'text', ''} end
  end
end
local unacked = redis.call('HGETALL', KEYS[1])
for i = 1, #unacked, 2 do look(unacked[i + 1], 'unacked', unacked[i]) end
for i = 2, #KEYS do
  for _, raw in ipairs(redis.call('LRANGE', KEYS[i], 0, -1)) do look(raw, 'listed', KEYS[i]) end
end
local replies = {}
for id, place in pairs(found) do
  replies[#replies + 1] = id
  replies[#replies + 1] = place[1]
  replies[#replies + 1] = place[2]
end
return replies
"""

# Move one message from a list (KEYS[1]) to the head of another (KEYS[2]), as ARGV[2],
# if ARGV[1] is still there: nobody took it meanwhile.
MOVE_LISTED = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""

# Move an unacknowledged message (tag ARGV[1] in the unacked hash KEYS[1] and its index
# KEYS[2]) to the head of a list (KEYS[3]), as ARGV[2], if nobody acknowledged or
# restored it meanwhile.
MOVE_UNACKED = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('RPUSH', KEYS[3], ARGV[2])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class ActiveJob:
    """A local job the database says is still queued or running (`worker`: the worker
    that claimed it)."""

    id: str
    status: str
    queue: str
    model: str
    worker: str = ""


@dataclass(frozen=True)
class Sightings:
    """Where one sweep found jobs: their messages in the broker (`listed`: in which
    queue's list; `unacked`: under which delivery tag; `in_broker`: only their id, in a
    message that could not be decoded), held by a live worker process (what it
    publishes), which workers and queues are live (a fresh heartbeat), and which queues
    have a live supervisor (a worker being restarted)."""

    listed: Mapping[str, str] = field(default_factory=dict)
    unacked: Mapping[str, str] = field(default_factory=dict)
    in_broker: frozenset[str] = frozenset()
    held: frozenset[str] = frozenset()
    alive_workers: frozenset[str] = frozenset()
    alive_queues: frozenset[str] = frozenset()
    supervised_queues: frozenset[str] = frozenset()

    def has_message(self, job_id: str) -> bool:
        return job_id in self.listed or job_id in self.unacked or job_id in self.in_broker


@dataclass(frozen=True)
class Lost:
    job: ActiveJob
    code: str
    message: str

    def describe(self) -> str:
        job = self.job
        return f"{job.id} {job.model} ({job.status} on {job.queue}): failed {self.code}, refunded"


@dataclass(frozen=True)
class Stranded:
    """A queued job whose message waits where no worker will take it, and the queues it
    may go to instead (live ones, or its own while its worker is being restarted)."""

    job: ActiveJob
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Moved:
    """A stranded job whose message went to `target`'s queue."""

    job: ActiveJob
    target: str

    def describe(self) -> str:
        job = self.job
        return f"{job.id} {job.model} (queued on {job.queue}, where no worker took it): moved to {self.target}"


@dataclass(frozen=True)
class Verdict:
    """One sweep's judgement: the jobs seen again (their count is dropped), the ones
    missed for the first time (their count starts), and of those missed too long, the
    ones to move and the ones lost."""

    seen_again: list[str]
    newly_unseen: list[str]
    lost: list[Lost]
    stranded: list[Stranded] = field(default_factory=list)


Replicas = Mapping[str, Sequence[str]]  # model -> its deployment's queues


# --- the decision, pure ------------------------------------------------------------


def is_seen(job: ActiveJob, sightings: Sightings, replicas: Replicas | None = None) -> bool:
    """Whether someone will still end the job: a live worker process that holds it; for
    a running job, its message held unacknowledged while the worker that claimed it
    lives (a message a dead worker held is running nowhere; a live one drops a job it
    no longer runs as `worker_lost`); for a queued job, its message in the list of a
    queue a live worker serves, or of one whose worker is being restarted when no
    replica could take it instead."""
    if job.id in sightings.held:
        return True
    if job.status == Job.Status.RUNNING:
        return sightings.has_message(job.id) and job.worker in sightings.alive_workers
    if job.id in sightings.in_broker:
        return True
    listed_on = sightings.listed.get(job.id)
    if listed_on is None:
        return False
    if listed_on in sightings.alive_queues:
        return True
    return listed_on in sightings.supervised_queues and not move_targets(job, sightings, replicas or {})


def move_targets(job: ActiveJob, sightings: Sightings, replicas: Replicas) -> tuple[str, ...]:
    """Where a stranded queued job may go: the live queues of its deployment (its own
    too, for a message stranded unacknowledged), else its own queue while a supervisor
    restarts its worker (an unacknowledged message only: a listed one is there)."""
    listed_on = sightings.listed.get(job.id)
    queues = dict.fromkeys([*replicas.get(job.model, ()), job.queue])
    live = tuple(q for q in queues if q in sightings.alive_queues and q != listed_on)
    if live:
        return live
    if job.id in sightings.unacked and job.queue in sightings.supervised_queues:
        return (job.queue,)
    return ()


def lost_reason(job: ActiveJob, sightings: Sightings) -> tuple[str, str]:
    """`worker_lost` for a running job whose worker is not alive (it died for good,
    host and all); `job_lost` for the rest: the broker lost the message, nothing can
    take it any more, or the live worker no longer runs it."""
    if job.status == Job.Status.RUNNING and job.worker not in sightings.alive_workers:
        return WORKER_LOST, WORKER_LOST_MESSAGE
    return JOB_LOST, JOB_LOST_MESSAGE


def judge(
    jobs: Iterable[ActiveJob],
    sightings: Sightings,
    unseen_since: dict[str, float],
    now: float,
    grace_s: float,
    replicas: Replicas | None = None,
) -> Verdict:
    """Which jobs are lost or stranded: those missed by every sweep for `grace_s`
    (`unseen_since`: when a sweep first missed each, `now` on the same clock). A queued
    job with a message somewhere no worker takes it, and a live queue to go to, is
    stranded; any other is lost."""
    replicas = replicas or {}
    seen_again, newly_unseen, lost, stranded = [], [], [], []
    for job in jobs:
        if is_seen(job, sightings, replicas):
            if job.id in unseen_since:
                seen_again.append(job.id)
        elif job.id not in unseen_since:
            newly_unseen.append(job.id)
        elif now - unseen_since[job.id] >= grace_s:
            targets = move_targets(job, sightings, replicas) if job.status == Job.Status.QUEUED else ()
            if targets and sightings.has_message(job.id):
                stranded.append(Stranded(job, targets))
            else:
                lost.append(Lost(job, *lost_reason(job, sightings)))
    return Verdict(seen_again, newly_unseen, lost, stranded)


def sweep_every_s(grace_s: float) -> float:
    """How often the supervisors sweep: several times per grace, so that a lost job ends
    soon after it, at most every 5 s (each sweep reads the database once)."""
    return min(MAX_SWEEP_EVERY_S, max(MIN_SWEEP_EVERY_S, grace_s / 6))


def grace_s() -> float:
    return settings.LLM_CONFIG.server.reap_after_s


def configured_queues() -> list[str]:
    """Every device queue of the config: each sweeper sweeps them all, not only its own."""
    return [device_queue_name(device) for device in settings.LLM_CONFIG.devices]


def configured_replicas() -> dict[str, list[str]]:
    """Each deployment's queues (one, or one per replica): where its jobs may go."""
    return {d.name: [device_queue_name(device) for device in d.devices] for d in settings.LLM_CONFIG.deployments}


# --- what the database and Redis say ------------------------------------------------


def active_local_jobs(queues: Sequence[str], created_before: datetime) -> list[ActiveJob]:
    """The local jobs of `queues` still queued or running that were created before
    `created_before` (a younger one may be between its row and its message), oldest
    first."""
    rows = (
        Job.objects.filter(queue__in=list(queues), status__in=Job.ACTIVE, created_at__lt=created_before)
        .filter(backend="local")
        .order_by("created_at")
        .values_list("id", "status", "queue", "model", "worker")
    )
    return [ActiveJob(str(job_id), *columns) for job_id, *columns in rows]


def broker_options() -> tuple[str, tuple[int, ...], str]:
    """kombu's Redis transport's key prefix, priority steps and separator, as this app
    sets them."""
    options = celery_app.conf.broker_transport_options or {}
    steps = tuple(options.get("priority_steps", Channel.priority_steps))
    return options.get("global_keyprefix", ""), steps, options.get("sep", Channel.sep)


def unacked_keys() -> tuple[str, str]:
    """kombu's unacked hash and its index (a sorted set by delivery time)."""
    options = celery_app.conf.broker_transport_options or {}
    prefix = options.get("global_keyprefix", "")
    return (
        prefix + options.get("unacked_key", Channel.unacked_key),
        prefix + options.get("unacked_index_key", Channel.unacked_index_key),
    )


def list_key(queue: str, step: int) -> str:
    """The Redis list of `queue`'s messages of priority step `step`, as kombu names it."""
    prefix, _steps, sep = broker_options()
    return prefix + (f"{queue}{sep}{step}" if step else queue)


def broker_keys(queues: Iterable[str]) -> list[str]:
    """The unacked hash, then every Redis list of `queues` (one per priority step), as
    kombu's Redis transport names them with this app's transport options."""
    _prefix, steps, _sep = broker_options()
    return [unacked_keys()[0], *(list_key(queue, step) for queue in queues for step in steps)]


def read_sightings(client: redis.Redis, jobs: Sequence[ActiveJob], replicas: Replicas | None = None) -> Sightings:
    """Where `jobs` are, in three round trips: every live worker of their queues and
    their replicas' and what each holds, which of them are supervised, then the
    broker's messages of the jobs no live worker holds (none read when every job is
    held)."""
    replicas = replicas or {}
    queues = sorted({job.queue for job in jobs} | {q for job in jobs for q in replicas.get(job.model, ())})
    holding = events.held_jobs(queues, client)
    alive_workers = frozenset(worker for workers in holding.values() for worker in workers)
    alive = frozenset(queue for queue, workers in holding.items() if workers)
    held = frozenset(job_id for workers in holding.values() for ids in workers.values() for job_id in ids)
    supervised = frozenset(events.supervised_queues(queues, client))
    wanted = [
        job for job in jobs if job.id not in held and (job.status == Job.Status.QUEUED or job.worker in alive_workers)
    ]
    listed: dict[str, str] = {}
    unacked: dict[str, str] = {}
    in_text: set[str] = set()
    if wanted:
        by_key = {list_key(queue, step): queue for queue in queues for step in broker_options()[1]}
        keys = broker_keys(queues)
        found = events.run_script(FIND_IN_BROKER, keys, [job.id for job in wanted], client)
        for job_id, kind, where in zip(found[0::3], found[1::3], found[2::3], strict=True):
            if kind == "unacked":
                unacked[job_id] = where
            elif kind == "listed":
                listed[job_id] = by_key[where]
            else:
                in_text.add(job_id)
    return Sightings(listed, unacked, frozenset(in_text), held, alive_workers, alive, supervised)


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
) -> list[Lost | Moved]:
    """One look at every active job of `queues` (default: all the config's) older than
    `grace` (default `[server] reap_after_s`): count how long each has been missed, then
    move those stranded for `grace` to a live queue and end, failed and refunded, those
    lost for `grace`. What it moved and ended. Raises `redis.RedisError` when Redis
    cannot be read, having ended nothing."""
    grace = grace_s() if grace is None else grace
    client = client or events.redis_client()
    queues = configured_queues() if queues is None else list(queues)
    jobs = active_local_jobs(queues, timezone.now() - timedelta(seconds=grace))
    unseen_since = {job_id: float(at) for job_id, at in client.hgetall(UNSEEN_KEY).items()}
    if not jobs and not unseen_since:
        return []
    replicas = configured_replicas()
    sightings = read_sightings(client, jobs, replicas) if jobs else Sightings()
    now = redis_now(client)
    verdict = judge(jobs, sightings, unseen_since, now, grace, replicas)
    candidates = {job.id for job in jobs}
    forgotten = [*verdict.seen_again, *ended_jobs(job_id for job_id in unseen_since if job_id not in candidates)]
    note_unseen(client, verdict.newly_unseen, now, forgotten)
    moved = move_stranded(client, verdict.stranded, sightings)
    ended = [lost for lost in verdict.lost if end_lost(lost)]
    settled = [lost.job.id for lost in verdict.lost] + [move.job.id for move in moved]
    if settled:
        with contextlib.suppress(redis.RedisError):  # else a later sweep finds them ended or moved
            note_unseen(client, [], now, settled)
    return [*moved, *ended]


def move_stranded(client: redis.Redis, stranded: Sequence[Stranded], sightings: Sightings) -> list[Moved]:
    """Move each stranded job's message to the head of the target queue with the
    shortest expected wait (counting the jobs moved before it), newest first, so that
    they run oldest first; record its new queue on its row."""
    if not stranded:
        return []
    targets = sorted({queue for item in stranded for queue in item.targets})
    states = dict(zip(targets, events.queue_states(targets), strict=True))
    listed: dict[str, list[str]] = {}  # a list's messages, read once per sweep
    moved = []
    for item in reversed(stranded):
        options = [states[queue] for queue in item.targets]
        target = item.targets[choose_replica(options, item.job.model)]
        if move_message(client, item.job, sightings, target, listed):
            states[target] = dataclasses.replace(states[target], pending=states[target].pending + 1)
            Job.objects.filter(id=item.job.id).update(queue=target)
            moved.append(Moved(item.job, target))
    return moved


def move_message(
    client: redis.Redis, job: ActiveJob, sightings: Sightings, target: str, listed: dict[str, list[str]]
) -> bool:
    """Move the job's message, addressed to `target` (its routing key: where kombu
    restores it should its next worker die), to the head of `target`'s list of its
    priority; atomically, and only if nobody took it meanwhile."""
    tag = sightings.unacked.get(job.id)
    if tag is not None:
        hash_key, index_key = unacked_keys()
        raw = client.hget(hash_key, tag)
        if raw is None:
            return False
        message, _exchange, _routing_key = json.loads(raw)
        redelivered = readdressed(message, target, redelivered=True)
        keys = [hash_key, index_key, list_key(target, priority_step(message))]
        return bool(events.run_script(MOVE_UNACKED, keys, [tag, json.dumps(redelivered)], client))
    queue = sightings.listed.get(job.id)
    if queue is None:
        return False
    _prefix, steps, _sep = broker_options()
    for source in (list_key(queue, step) for step in steps):
        if source not in listed:
            listed[source] = client.lrange(source, 0, -1)
        for raw in listed[source]:
            message = json.loads(raw)
            if message_job_id(message) == job.id:
                keys = [source, list_key(target, priority_step(message))]
                moved = events.run_script(MOVE_LISTED, keys, [raw, json.dumps(readdressed(message, target))], client)
                return bool(moved)
    return False


def readdressed(message: dict, queue: str, redelivered: bool = False) -> dict:
    """A kombu message addressed to `queue` (the default exchange, its name as the
    routing key), marked redelivered as kombu's own restore marks one it had delivered."""
    message = json.loads(json.dumps(message))
    properties = message.setdefault("properties", {})
    properties["delivery_info"] = {**properties.get("delivery_info", {}), "exchange": "", "routing_key": queue}
    if redelivered:
        message.setdefault("headers", {})["redelivered"] = True
        properties["delivery_info"]["redelivered"] = True
    return message


def priority_step(message: dict) -> int:
    """The priority step of a message's list, as kombu's Redis transport picks it."""
    _prefix, steps, _sep = broker_options()
    try:
        priority = max(min(int(message["properties"]["priority"]), Channel.max_priority), Channel.min_priority)
    except (TypeError, ValueError, KeyError):
        priority = Channel.default_priority
    return steps[bisect.bisect(steps, priority) - 1]


def message_job_id(message: object) -> str | None:
    """The job id of a kombu message (its Celery task id), None if it has none."""
    headers = message.get("headers") if isinstance(message, dict) else None
    return headers.get("id") if isinstance(headers, dict) else None


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


def sweep_if_due(owner: str, client: redis.Redis | None = None) -> list[Lost | Moved]:
    """A supervisor's periodic sweep: only when no sweeper anywhere swept this interval
    (the lock expires after it, never released early), so N hosts cost one sweep."""
    client = client or events.redis_client()
    every = sweep_every_s(grace_s())
    if not client.set(LOCK_KEY, owner, nx=True, px=int(every * 1000)):
        return []
    return sweep(client=client)
