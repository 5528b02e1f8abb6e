"""Read queries on jobs: a key's own job, queue position, usage per day."""

from __future__ import annotations

from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncDate

from djangollmapi.errors import ApiError
from llmjobs.models import Job


def job_for_key(job_id: str, key_id: int) -> Job:
    """Only the key that made a job may see it; anyone else gets the same 404 as for a
    job that does not exist."""
    job = Job.objects.filter(id=job_id, api_key_id=key_id).first()
    if job is None:
        raise ApiError(404, "job_not_found", f"No job {job_id}.")
    return job


def queue_position(job: Job) -> int:
    """How many jobs on the same device queue are ahead of this one (0 = next)."""
    return Job.objects.filter(queue=job.queue, status__in=Job.ACTIVE, created_at__lt=job.created_at).count()


def usage_by_day(key_id: int) -> list[dict]:
    rows = (
        Job.objects.filter(api_key_id=key_id)
        .annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(
            requests=Count("id"),
            calls=Count("id", filter=Q(refunded=False)),
            input_chars=Sum("input_chars"),
            output_chars=Sum("output_chars"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cost_usd=Sum("cost_usd"),
        )
        .order_by("day")
    )
    return [day_row(row) for row in rows]


def day_row(row: dict) -> dict:
    """JSON-ready: an ISO day, and the spend as a number (None when nothing was priced)."""
    cost = row["cost_usd"]
    return {**row, "day": row["day"].isoformat(), "cost_usd": None if cost is None else float(cost)}
