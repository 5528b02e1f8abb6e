"""Cross-cutting HTTP guards: body size limit and JSON for unexpected exceptions."""

from __future__ import annotations

import logging

import redis
from django.conf import settings
from django.core.exceptions import BadRequest, PermissionDenied, SuspiciousOperation
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from kombu.exceptions import OperationalError as BrokerError

from djangollmapi.errors import BROKER_UNAVAILABLE, ApiError, error_response

log = logging.getLogger("djangollmapi.errors")

API_PREFIXES = ("/api/", "/analyze/", "/v1/")
DJANGO_HANDLED = (Http404, PermissionDenied, SuspiciousOperation, BadRequest)


class JsonErrorsMiddleware:
    """Rejects oversized API bodies before anything reads them, and turns any exception
    that escapes a view into an OpenAI-shaped JSON error: infrastructure outages become
    503 (the client may retry), anything else a logged 500 with no traceback in it."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.max_body_bytes = settings.LLM_CONFIG.server.max_body_bytes

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith(API_PREFIXES):
            if "HTTP_TRANSFER_ENCODING" in request.META and not request.META.get("CONTENT_LENGTH"):
                # Django would read a chunked body as empty, and the size limit could
                # not be checked before reading it.
                return error_response(411, "length_required", "Send the body with a Content-Length header.")
            if self.body_too_large(request):
                return error_response(
                    413,
                    "request_too_large",
                    f"The request body is larger than {self.max_body_bytes} bytes.",
                )
        return self.get_response(request)

    def body_too_large(self, request: HttpRequest) -> bool:
        try:
            return int(request.META.get("CONTENT_LENGTH") or 0) > self.max_body_bytes
        except ValueError:
            return True

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse | None:
        if isinstance(exc, DJANGO_HANDLED):
            return None  # Django answers these itself (404, 403, 400), as JSON for the API
        if isinstance(exc, ApiError):
            return exc.response()
        if isinstance(exc, (OperationalError, InterfaceError)):
            log.error("database unavailable on %s: %s", request.path, type(exc).__name__)
            return error_response(503, "database_unavailable", "The database is unavailable; retry later.")
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, BrokerError)):
            log.error("broker unavailable on %s: %s", request.path, type(exc).__name__)
            return error_response(503, "broker_unavailable", BROKER_UNAVAILABLE)
        if isinstance(exc, DatabaseError):
            log.exception("database error on %s", request.path)
        else:
            log.exception("unhandled error on %s", request.path)
        return error_response(500, "internal_error", "The server failed to handle the request.")
