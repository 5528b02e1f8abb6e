"""Cross-cutting HTTP concerns: one log line per API call, the body size limit, and
JSON for unexpected exceptions."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis
from django.conf import settings
from django.core.exceptions import BadRequest, PermissionDenied, SuspiciousOperation
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from kombu.exceptions import OperationalError as BrokerError

from djangollmapi import metrics
from djangollmapi.errors import BROKER_UNAVAILABLE, DATABASE_UNAVAILABLE, ApiError, error_response

log = logging.getLogger("djangollmapi.errors")

API_PREFIXES = ("/api/", "/analyze/", "/v1/", "/extras/")
request_log = logging.getLogger("djangollmapi.requests")


def log_fields(request: HttpRequest) -> dict[str, Any]:
    """What views know about a call and want in its log line (model, backend, job,
    tokens); they add to this dict, the middleware writes it."""
    request = getattr(request, "_request", request)  # DRF wraps Django's request
    return request.__dict__.setdefault("_dla_log_fields", {})


def note_job(request: HttpRequest, job: Any) -> None:
    """A call's job in its log line (model, backend, the job id as request id), and
    the rate limits it was admitted under in its response's headers."""
    log_fields(request).update(model=job.model, backend=job.backend, request_id=str(job.id))
    headers = getattr(job, "rate_headers", None)
    if headers:
        getattr(request, "_request", request).__dict__["_dla_rate_headers"] = headers


def key_label(request: HttpRequest) -> str:
    """Who called, as the authentication class saw it (`request.auth`): the key's
    public prefix (never its secret), "jwt" for a token, "-" for none."""
    caller = getattr(request, "auth", None)
    return getattr(caller, "label", None) or "-"


class RequestLogMiddleware:
    """One structured line per API call — request id, key prefix, model, backend,
    status, tokens, latency — and never the prompt or the answer. A stream is logged
    when it ends, so its line has the final tokens and its whole duration."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not request.path.startswith(API_PREFIXES):
            return self.get_response(request)
        started = time.monotonic()
        response = self.get_response(request)
        for name, value in request.__dict__.get("_dla_rate_headers", {}).items():
            response.headers.setdefault(name, value)  # x-ratelimit-*: the admission's
        write = lambda: self.write(request, response, started)  # noqa: E731
        if response.streaming:
            response.streaming_content = logged_when_done(response.streaming_content, write)
        else:
            write()
        return response

    def write(self, request: HttpRequest, response: HttpResponse, started: float) -> None:
        fields = log_fields(request)
        line = {
            "request_id": fields.pop("request_id", None) or response.get("X-Request-Id"),
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "key": key_label(request),
            **fields,
            "latency_ms": round((time.monotonic() - started) * 1000, 1),
        }
        request_log.info(json.dumps(line, separators=(",", ":"), default=str))
        match = getattr(request, "resolver_match", None)
        route = match.route if match is not None else "unmatched"
        metrics.REQUESTS.labels(route, str(response.status_code), fields.get("model", "")).inc()
        metrics.REQUEST_SECONDS.labels(route).observe(time.monotonic() - started)


def logged_when_done(content: Iterable[bytes], write: Callable[[], None]) -> Iterator[bytes]:
    try:
        yield from content
    finally:
        write()


DJANGO_HANDLED = (Http404, PermissionDenied, SuspiciousOperation, BadRequest)


class JsonErrorsMiddleware:
    """Rejects oversized API bodies before anything reads them, and turns any exception
    that escapes a view into an OpenAI-shaped JSON error: infrastructure outages become
    503 (the client may retry), anything else a logged 500 with no traceback in it."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.max_body_bytes = settings.LLM_CONFIG.server.max_body_bytes

    def __call__(self, request: HttpRequest) -> HttpResponse:
        api = request.path.startswith(API_PREFIXES)
        if api and "HTTP_TRANSFER_ENCODING" in request.META and not request.META.get("CONTENT_LENGTH"):
            # Django would read a chunked body as empty, and the size limit could
            # not be checked before reading it.
            return error_response(411, "length_required", "Send the body with a Content-Length header.")
        if self.body_too_large(request, api):
            # Every path, the admin's too: a body this large is never read (the web
            # worker drops it after the answer), so a slow one holds no thread.
            return error_response(
                413,
                "request_too_large",
                f"The request body is larger than {self.max_body_bytes} bytes.",
            )
        return self.get_response(request)

    def body_too_large(self, request: HttpRequest, api: bool) -> bool:
        try:
            return int(request.META.get("CONTENT_LENGTH") or 0) > self.max_body_bytes
        except ValueError:
            return api  # elsewhere Django itself refuses a bad length

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse | None:
        if isinstance(exc, DJANGO_HANDLED):
            return None  # Django answers these itself (404, 403, 400), as JSON for the API
        if isinstance(exc, ApiError):
            return exc.response()
        if isinstance(exc, (OperationalError, InterfaceError)):
            log.error("database unavailable on %s: %s", request.path, type(exc).__name__)
            return error_response(503, "database_unavailable", DATABASE_UNAVAILABLE)
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, BrokerError)):
            log.error("broker unavailable on %s: %s", request.path, type(exc).__name__)
            return error_response(503, "broker_unavailable", BROKER_UNAVAILABLE)
        if isinstance(exc, DatabaseError):
            log.exception("database error on %s", request.path)
        else:
            log.exception("unhandled error on %s", request.path)
        return error_response(500, "internal_error", "The server failed to handle the request.")
