"""Read queries on jobs: a key's own job, its place in the queue (usage per day is
`llmjobs.usage`)."""

from __future__ import annotations

from djangollmapi.errors import ApiError
from llmjobs import events
from llmjobs.models import Job


def job_for_key(job_id: str, key_id: int) -> Job:
    """Only the key that made a job may see it; anyone else gets the same 404 as for a
    job that does not exist."""
    job = Job.objects.filter(id=job_id, api_key_id=key_id).first()
    if job is None:
        raise ApiError(404, "job_not_found", f"No job {job_id}.")
    return job


def queue_place(job: Job) -> tuple[int, float | None]:
    """Where a queued job stands: how many jobs go before it (0 = next), in the order
    its worker's fair admission will run them, and in how many seconds a slot should be
    its, from the deployment's recent job times (None until one is measured). A job no
    worker holds yet waits behind all that its queue's workers hold."""
    per_worker = events.worker_deployments(job.queue)
    place = place_among_held(job, per_worker)
    if place is not None:
        return place
    deployment = events.merge_deployments(per_worker.values()).get(job.model)
    sent_before = Job.objects.filter(queue=job.queue, status=Job.Status.QUEUED, created_at__lt=job.created_at)
    position = max(sent_before.count(), len(deployment["waiting"]) if deployment else 0)
    return position, eta_s(position, deployment)


def held_place(job: Job) -> tuple[int, float | None] | None:
    """The job's place among those its worker holds waiting (one Redis read, no
    database), or None when it is not one of them (running, ended, or not held yet)."""
    return place_among_held(job, events.worker_deployments(job.queue))


def place_among_held(job: Job, per_worker: dict[str, dict[str, dict]]) -> tuple[int, float | None] | None:
    """Its place in the waiting jobs of the worker that holds it, at that worker's pace."""
    job_id = str(job.id)
    for deployments in per_worker.values():
        deployment = deployments.get(job.model)
        waiting = deployment["waiting"] if deployment else []
        if job_id in waiting:
            position = waiting.index(job_id)
            return position, eta_s(position, deployment)
    return None


def eta_s(position: int, deployment: dict | None) -> float | None:
    """Slots free at `max_batch / job_s` per second once all are busy: the job at
    `position` gets the (position - free + 1)th one."""
    if not deployment or not deployment.get("job_s"):
        return None
    slots = max(1, deployment["max_batch"])
    free = max(0, slots - deployment["running"])
    if position < free:
        return 0.0
    return round((position - free + 1) * deployment["job_s"] / slots, 3)
