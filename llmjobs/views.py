"""Seed-compatible endpoints: `POST /api/` (and `/analyze/`), async jobs, usage.
Views only translate HTTP; services do the work."""

from __future__ import annotations

from django.conf import settings
from django.http import JsonResponse
from django.urls import reverse
from rest_framework.views import APIView

from apikeys.authentication import parse_with_key_errors_first, presented_key
from djangollmapi.middleware import log_fields
from llmjobs import selectors, services
from llmjobs.models import Job
from llmjobs.validation import RunRequest, parse_run_request


def submit_run(request) -> tuple[Job, RunRequest]:
    """Check key and body, take one call, record and enqueue the job. Key errors win
    over body errors, as a client would expect, at the cost of one read on bad bodies."""
    presented = presented_key(request)
    run = parse_with_key_errors_first(presented, parse_run_request, request.data)
    job = services.submit_job(presented, run.deployment, "run", run.text, input_text=run.text)
    log_fields(request).update(model=job.model, backend="local", request_id=str(job.id))
    return job, run


class RunView(APIView):
    """`POST /api/ {"text": ...}` → `{"message": ..., "job_id": ..., "model": ...}`."""

    authentication_classes = []

    def post(self, request) -> JsonResponse:
        job, run = submit_run(request)
        services.release_db_connection()
        output = services.wait_for_output(job, settings.LLM_CONFIG.job_timeout_for(run.deployment))
        return JsonResponse({"message": output, "job_id": str(job.id), "model": job.model})


class JobCreateView(APIView):
    """`POST /api/jobs/` → 202 and a Location to poll."""

    authentication_classes = []

    def post(self, request) -> JsonResponse:
        job, _run = submit_run(request)
        location = reverse("job-detail", args=[job.id])
        response = JsonResponse({"job_id": str(job.id), "status": job.status, "model": job.model}, status=202)
        response["Location"] = request.build_absolute_uri(location)
        return response


class JobDetailView(APIView):
    """`GET /api/jobs/<id>/`: status, queue position, result or error."""

    def get(self, request, job_id) -> JsonResponse:
        job = selectors.job_for_key(job_id, request.auth.id)
        return JsonResponse(job_body(job))


def job_body(job: Job) -> dict:
    body = {
        "job_id": str(job.id),
        "model": job.model,
        "status": job.status,
        "created_at": job.created_at.isoformat(),
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }
    if job.status == Job.Status.QUEUED:
        body["queue_position"] = selectors.queue_position(job)
    if job.status == Job.Status.SUCCEEDED:
        body["result"] = {"message": job.output}
    if job.status == Job.Status.FAILED:
        body["error"] = {"code": job.error_code, "message": job.error_message}
    return body


class UsageView(APIView):
    """`GET /api/usage/`: the calling key's calls and characters per day, quota, window."""

    def get(self, request) -> JsonResponse:
        api_key = request.auth
        return JsonResponse(
            {
                "key": {
                    "name": api_key.name,
                    "prefix": api_key.prefix,
                    "status": api_key.status(),
                    "calls_used": api_key.calls_used,
                    "max_calls": api_key.max_calls,
                    "calls_left": api_key.calls_left,
                    "tokens_used": api_key.tokens_used,
                    "max_tokens_total": api_key.max_tokens_total,
                    "tokens_left": api_key.tokens_left,
                    "valid_from": api_key.valid_from.isoformat() if api_key.valid_from else None,
                    "valid_until": api_key.valid_until.isoformat() if api_key.valid_until else None,
                },
                "days": selectors.usage_by_day(api_key.id),
            }
        )
