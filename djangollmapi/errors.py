"""One way to fail: OpenAI-shaped JSON errors, `{"error": {message, type, code, param}}`.

Views raise `ApiError`; DRF's exception handler and our middleware turn it (and
anything unexpected) into JSON with the right status, so a client never sees an HTML
page, a traceback or a secret.
"""

from __future__ import annotations

import logging

from django.http import JsonResponse
from rest_framework import exceptions as drf_exceptions

log = logging.getLogger(__name__)

BROKER_UNAVAILABLE = "The job queue is unavailable; retry later."
DATABASE_UNAVAILABLE = "The database is unavailable; retry later."

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    411: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "invalid_request_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
    505: "invalid_request_error",
}


class ApiError(Exception):
    """An error the client should see, with its HTTP status and stable `code`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.param, self.headers = param, headers or {}

    def response(self) -> JsonResponse:
        return error_response(self.status, self.code, self.message, param=self.param, headers=self.headers)


def error_body(status: int, code: str, message: str, *, param: str | None = None) -> dict:
    """The error shape itself, for the layers below Django too (djangollmapi.webworker)."""
    kind = ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JsonResponse:
    """The single constructor of error bodies (so it also counts them by code)."""
    from djangollmapi import metrics  # it imports this module

    metrics.ERRORS.labels(code).inc()
    response = JsonResponse(error_body(status, code, message, param=param), status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def drf_exception_handler(exc: Exception, context: dict) -> JsonResponse | None:
    """Map DRF's own exceptions to our shape; return None for the rest so the
    middleware decides (and logs) what an unexpected exception becomes."""
    if isinstance(exc, ApiError):
        return exc.response()
    if isinstance(exc, drf_exceptions.ParseError):
        return error_response(400, "invalid_json", "The request body is not valid JSON.")
    if isinstance(exc, drf_exceptions.UnsupportedMediaType):
        return error_response(415, "unsupported_media_type", "Send the body as application/json.")
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        return error_response(
            405, "method_not_allowed", f"Method {exc.args[0] if exc.args else ''} is not allowed here."
        )
    if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)):
        return error_response(
            401, "invalid_api_key", "Missing or invalid API key.", headers={"WWW-Authenticate": "Bearer"}
        )
    if isinstance(exc, drf_exceptions.NotFound):
        return error_response(404, "not_found", "Not found.")
    if isinstance(exc, drf_exceptions.APIException):
        return error_response(exc.status_code, exc.default_code, str(exc.detail))
    return None


def bad_request_view(request, exception=None) -> JsonResponse:
    return error_response(400, "bad_request", "The request could not be understood.")


def permission_denied_view(request, exception=None) -> JsonResponse:
    return error_response(403, "permission_denied", "You may not do this.")


def not_found_view(request, exception=None) -> JsonResponse:
    return error_response(404, "not_found", f"No endpoint at {request.path}.")


def server_error_view(request) -> JsonResponse:
    return error_response(500, "internal_error", "The server failed to handle the request.")
