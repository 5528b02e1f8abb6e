"""Probes for load balancers and operators, no key needed and nothing secret in them:
`/healthz` (this process answers) and `/readyz` (the database, Redis, for each
deployment whether a worker serves its device and whether its model loaded, and each
upstream provider's circuit breaker)."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache

from djangollmapi.errors import error_response
from llmjobs import events
from llmjobs.routing import QueueState, device_queue_name

log = logging.getLogger(__name__)


@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is up and answers (a liveness probe: checks nothing else)."""
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed(request)
    return JsonResponse({"status": "ok"})


@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    """200 when the database and Redis answer and every device has a live worker, else
    503; either way the JSON says which part is not ready, per deployment."""
    if request.method not in ("GET", "HEAD"):
        return method_not_allowed(request)
    checks = {"database": database_ready(), "redis": redis_ready()}
    deployments = deployment_states() if checks["redis"] else {}
    ready = all(checks.values()) and all(d["worker"] for d in deployments.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks, "deployments": deployments}
    if settings.LLM_CONFIG.upstreams:
        # Shown, never a reason to be not ready: a provider's outage is not this node's.
        body["providers"] = provider_states()
    return JsonResponse(body, status=200 if ready else 503)


def method_not_allowed(request: HttpRequest) -> JsonResponse:
    message = f"Method {request.method} is not allowed here; use GET."
    return error_response(405, "method_not_allowed", message, headers={"Allow": "GET, HEAD"})


def database_ready() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception as exc:
        log.warning("readyz: the database does not answer: %s", type(exc).__name__)
        return False


def redis_ready() -> bool:
    try:
        return bool(events.redis_client().ping())
    except Exception as exc:
        log.warning("readyz: Redis does not answer: %s", type(exc).__name__)
        return False


def deployment_states() -> dict[str, dict[str, Any]]:
    """Each deployment: its device, whether a worker serves it, its model's load state
    (`loaded`, `failed` with the reason, `not_loaded`, `unknown` without a worker). A
    deployment on several devices lists them (`devices`) with each one's state
    (`replicas`), and is served while any of them is, at its best load state."""
    devices = settings.LLM_CONFIG.devices
    queues = dict(zip(devices, events.queue_states([device_queue_name(d) for d in devices]), strict=True))
    states = {}
    for deployment in settings.LLM_CONFIG.deployments:
        replicas = {device: replica_state(queues[device], deployment.name) for device in deployment.devices}
        if not deployment.replicated:
            states[deployment.name] = {"device": deployment.device, **replicas[deployment.device]}
            continue
        rank = {"loaded": 3, "failed": 2, "not_loaded": 1}
        best = max(replicas.values(), key=lambda r: (r["worker"], rank.get(r["model"], 0)))
        states[deployment.name] = {"devices": list(deployment.devices), **best, "replicas": replicas}
    return states


def provider_states() -> dict[str, dict[str, Any]]:
    """Each upstream provider's circuit breaker: `closed`, `open` (with `retry_in_s`)
    or `half_open`, its `consecutive_failures`, and `retry_after_s` while its
    Retry-After runs (from this process's own states while Redis is away)."""
    from gateway import breaker

    return breaker.board().report(u.name for u in settings.LLM_CONFIG.upstreams)


def replica_state(queue: QueueState, model: str) -> dict[str, Any]:
    """One device's part in a deployment: a live worker, and the model's load state there."""
    load = queue.models.get(model, {}) if queue.alive else {}
    entry = {"worker": queue.alive, "model": load.get("state", "unknown")}
    if load.get("error"):
        entry["error"] = load["error"]
    return entry
