"""Seed-compatible endpoints: `POST /api/` (and `/analyze/`), async jobs, usage.
Views only translate HTTP: the caller is `request.auth` (apikeys.authentication), the
model is routed once (djangollmapi.routes), the job's life is llmjobs.lifecycle and
the wait llmjobs.follow."""

from __future__ import annotations

from django.conf import settings
from django.http import JsonResponse
from django.urls import reverse

from apikeys.authentication import key_errors_first
from apikeys.views import CallView, KeyView
from djangollmapi.middleware import note_job
from djangollmapi.routes import LocalRoute, route_local_model
from llmjobs import openapi, selectors, sending, usage
from llmjobs.follow import wait_for_output
from llmjobs.models import Job
from llmjobs.validation import parse_run_request


def submit_run(request) -> tuple[Job, LocalRoute]:
    """Body, route, call and job, in that order of reported errors (a bad key is
    reported before a bad body)."""
    config = settings.LLM_CONFIG
    with key_errors_first(request.auth):
        run = parse_run_request(request.data, config.server.max_input_chars)
        route = route_local_model(run.model or "")
    job = sending.submit(request.auth.presented, route, run)
    note_job(request, job)
    return job, route


class RunView(CallView):
    """`POST /api/ {"text": ...}` → `{"message": ..., "job_id": ..., "model": ...}`."""

    @openapi.run
    def post(self, request) -> JsonResponse:
        job, route = submit_run(request)
        output = wait_for_output(job, route.timeout_s)
        return JsonResponse({"message": output, "job_id": str(job.id), "model": job.model})


class JobCreateView(CallView):
    """`POST /api/jobs/` → 202 and a Location to poll."""

    @openapi.create_job
    def post(self, request) -> JsonResponse:
        job, _route = submit_run(request)
        location = reverse("job-detail", args=[job.id])
        response = JsonResponse({"job_id": str(job.id), "status": job.status, "model": job.model}, status=202)
        response["Location"] = request.build_absolute_uri(location)
        return response


class JobDetailView(KeyView):
    """`GET /api/jobs/<id>/`: status, queue position, result or error."""

    @openapi.retrieve_job
    def get(self, request, job_id) -> JsonResponse:
        job = selectors.job_for_key(job_id, request.auth.key().id)
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
        body["queue_position"], body["eta_s"] = selectors.queue_place(job)
    if job.status == Job.Status.SUCCEEDED:
        body["result"] = {"message": job.output}
    if job.status == Job.Status.FAILED:
        body["error"] = {"code": job.error_code, "message": job.error_message}
    return body


class UsageView(KeyView):
    """`GET /api/usage/`: the calling key's calls and characters per day, quota, window."""

    @openapi.usage
    def get(self, request) -> JsonResponse:
        api_key = request.auth.key()
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
                "days": usage.usage_by_day(api_key.id),
            }
        )
