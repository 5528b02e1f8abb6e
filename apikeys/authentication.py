"""Bearer-key authentication, DRF-shaped (authenticate / authenticate_header)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from django.conf import settings
from django.http import HttpRequest
from rest_framework.authentication import BaseAuthentication

from apikeys import jwt_auth, selectors
from apikeys.keys import PresentedKey, parse_key
from apikeys.models import ApiKey
from djangollmapi.errors import ApiError

T = TypeVar("T")


def presented_key(request: HttpRequest) -> PresentedKey:
    """The key from `Authorization: Bearer <key>`, checked for form only (no database):
    a missing header, another scheme or a malformed key is a 401 at once. With [jwt]
    configured, a bearer JWT is verified instead and stands for its subject's key
    (apikeys.jwt_auth: one read, and one insert on a subject's first call)."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if not header:
        raise selectors.unauthorized("missing_api_key", "Send your API key as 'Authorization: Bearer <key>'.")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer":
        raise selectors.unauthorized(
            "invalid_authorization_header", "The Authorization header must use the Bearer scheme."
        )
    credentials = credentials.strip()
    if not credentials:
        raise selectors.unauthorized("missing_api_key", "The Bearer header carries no API key.")
    jwt_config = settings.LLM_CONFIG.jwt
    if jwt_config is not None and jwt_auth.looks_like_jwt(credentials):
        return jwt_auth.presented_jwt(credentials, jwt_config)
    presented = parse_key(credentials)
    if presented is None:
        raise selectors.unauthorized("invalid_api_key", "Incorrect API key provided.")
    return presented


def parse_with_key_errors_first(presented: PresentedKey, parse: Callable[[Any], T], data: Any) -> T:
    """`parse(data)`; when the body is bad, a bad key is reported instead, as a client
    would expect, at the cost of one read on bad bodies only."""
    try:
        return parse(data)
    except ApiError:
        selectors.verified_key(presented)
        raise


class ApiKeyAuthentication(BaseAuthentication):
    """For reads that consume no call (job status, usage): verifies the key only."""

    def authenticate(self, request) -> tuple[ApiKey, ApiKey]:
        api_key = selectors.verified_key(presented_key(request))
        return api_key, api_key

    def authenticate_header(self, request) -> str:
        return "Bearer"
