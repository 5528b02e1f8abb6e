"""A job created and sent: where a local job goes (its device's queue, or its
replica's with the shortest expected wait), its admission and row (`llmjobs.admission`),
its message on the queue, or a fast refusal (no worker, a full queue, the broker down)
that fails and refunds it; and a route's tries, handed from backend to backend. What
ends a job is `llmjobs.lifecycle`'s."""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from django.conf import settings
from django.utils import timezone

from apikeys.keys import PresentedKey
from djangollmapi.errors import BROKER_UNAVAILABLE, ApiError
from djangollmapi.routes import Backend, FallbackRoute, LocalRoute
from llmjobs import events, taskmessage
from llmjobs.admission import JobRequest, admit_job
from llmjobs.lifecycle import fail, release_db_connection
from llmjobs.models import Job
from llmjobs.routing import QueueState, choose_replica, device_queue_name

log = logging.getLogger(__name__)


def submit(presented: PresentedKey, route: LocalRoute, request: JobRequest) -> Job:
    """Choose the job's device queue, take the call and record the job in one
    transaction, then queue it there; a failed enqueue fails and refunds it (503)."""
    placement = place(route)
    job, weight = admit_job(presented, route.name, request, queue=placement.queue)
    enqueue(job, route, request.payload(), weight=weight, state=placement.state)
    return job


def local_queue(route: LocalRoute) -> str:
    """The queue a job of this deployment is sent to (its replica with the shortest
    expected wait, when it has several: `place`)."""
    return place(route).queue


@dataclass(frozen=True)
class Placement:
    """Where a job goes: its queue, and that queue's state as the choice read it (None
    when Redis could not be read: `enqueue` tries again, and fails the job)."""

    queue: str
    state: QueueState | None


def place(route: LocalRoute) -> Placement:
    """The queue of a job of `route`: its device's, or for a deployment on several
    devices (replicas) the one with the shortest expected wait now
    (`llmjobs.routing.choose_replica`), noted at once so that the calls right behind
    count this job there before its worker publishes it. Read before the admission's
    transaction, which then holds no lock across a Redis round trip."""
    queues = [device_queue_name(device) for device in route.deployment.devices]
    try:
        states = events.queue_states(queues)
        index = choose_replica(states, route.name) if len(queues) > 1 else 0
        if len(queues) > 1 and states[index].alive:
            events.note_routed(queues[index], uuid.uuid4().hex)
    except (redis.RedisError, OSError):
        return Placement(queues[0], None)
    return Placement(queues[index], states[index])


def open_routed(
    presented: PresentedKey, route: FallbackRoute, request: JobRequest, first: Backend, runner: str = ""
) -> Job:
    """Take a route's call once, whichever of its backends serves it (its reservation
    and reserved spend the most any of them may use), and record its job as the
    `first` backend's try (`runner`: the web process that runs an upstream try,
    `upstreamjobs.runner`); the job's `key_weight` is for its device's fair admission."""
    job, weight = admit_job(presented, route.name, request, price=route, **try_columns(first, runner))
    job.key_weight = weight
    release_db_connection()
    return job


def next_try(job: Job, backend: Backend, tries: int, runner: str = "") -> bool:
    """Hand an active job to another backend of its route (the one before failed before
    its answer started, or could not be tried): its `tries` so far, and the new
    backend's queue and status. False when the job had ended meanwhile."""
    columns = try_columns(backend, runner)
    columns["started_at"] = timezone.now() if columns["status"] == Job.Status.RUNNING else None
    updated = Job.objects.filter(id=job.id, status__in=Job.ACTIVE).update(tries=tries, **columns)
    for name, value in columns.items():
        setattr(job, name, value)
    job.tries = tries
    return bool(updated)


def try_columns(backend: Backend, runner: str = "") -> dict[str, Any]:
    """A job's columns while `backend` has it: a local one waits in its device's queue
    (its worker named when one claims it), an upstream one runs at once in the web
    process `runner`."""
    if isinstance(backend, LocalRoute):
        return {"backend": "local", "queue": local_queue(backend), "status": Job.Status.QUEUED, "worker": ""}
    return {"backend": backend.provider, "queue": "", "status": Job.Status.RUNNING, "worker": runner}


def enqueue(
    job: Job,
    route: LocalRoute,
    payload: Any,
    weight: int = 1,
    state: QueueState | None = None,
    *,
    fail_refused: bool = True,
) -> None:
    """Send the job to its device's queue (whose `state` the caller may have read
    already, for `route`'s deployment, whatever name the client called), or refuse it
    fast (503) when no worker serves that queue, it is full, or the broker is down:
    never leave a client hanging. A refused job is failed unless `fail_refused` is
    False (a route's next backend will take it)."""
    try:
        state = state if state is not None else events.queue_state(job.queue)
        if not state.alive:
            raise ApiError(503, "no_worker", f"No worker is serving the model {job.model!r}; retry later.")
        load = state.models.get(route.name, {})
        if load.get("state") == "failed":
            raise model_unavailable(job.model, load.get("error", ""))
        max_depth = settings.LLM_CONFIG.server.max_queue_depth
        if state.depth >= max_depth:
            wait = queue_drain_s(events.deployment_states(job.queue), state.depth - max_depth + 1)
            raise ApiError(
                429,
                "queue_full",
                f"The queue for this model is full; retry in about {wait} s.",
                headers={"Retry-After": str(wait)},
            )
        message = taskmessage.run_job_message(
            str(job.id),
            (str(job.id), route.name, job.kind, payload),
            # who asks, for the worker's fair admission across keys
            {"key": job.api_key_id, "weight": weight, "sent": job.created_at.timestamp()},
            job.queue,
            settings.LLM_CONFIG.job_time_limits(route.deployment),
        )
        taskmessage.publish(events.redis_client(), job.queue, message)
    except ApiError as exc:
        if fail_refused:
            fail(job.id, exc.code, exc.message)
        raise
    except (redis.RedisError, OSError) as exc:
        log.error("enqueue failed for job %s: %s", job.id, type(exc).__name__)
        if fail_refused:
            fail(job.id, "broker_unavailable", "The job queue is unavailable.")
        raise ApiError(503, "broker_unavailable", BROKER_UNAVAILABLE) from exc


def queue_drain_s(deployments: dict[str, dict], excess: int) -> int:
    """When the device will have taken `excess` more jobs off its queue, from what its
    worker measures: each deployment ends `max_batch` jobs every `job_s` (its recent
    job time). 1 s before anything was measured; at most 10 minutes."""
    per_s = sum(d["max_batch"] / d["job_s"] for d in deployments.values() if d.get("job_s") and d.get("max_batch"))
    if per_s <= 0:
        return 1
    return max(1, min(600, math.ceil(excess / per_s)))


def model_unavailable(model: str, reason: str) -> ApiError:
    """A deployment whose model failed to load in its worker: 503 with the reason, so
    its calls neither queue nor wait for a load that will fail again."""
    return ApiError(
        503,
        "model_unavailable",
        f"The model {model!r} failed to load: {reason}",
        headers={"Retry-After": str(int(MODEL_RELOAD_AFTER_S))},
    )


MODEL_RELOAD_AFTER_S = 60.0  # a worker tries a failed load again after this long
