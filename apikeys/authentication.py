"""Who is calling: the one authentication class of every API view, DRF-shaped
(`authenticate(request) -> (user, auth)`, `authenticate_header` for the 401's
`WWW-Authenticate`).

The `Authorization` header is parsed in one function, once per request, and a bearer
JWT (with `[jwt]`) is verified once, here. A view reads the result as `request.auth`,
a `Caller`: the key as presented, checked for form only. Taking a call checks it
against the database in the same conditional UPDATE that takes the call
(`apikeys.services.take_call`), so the hot path reads no key row first; views that take
no call (usage, job status, the model list) ask `caller.key()`, one read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.conf import settings
from django.http import HttpRequest
from rest_framework.authentication import BaseAuthentication

from apikeys import jwt_auth, selectors
from apikeys.keys import PresentedKey, parse_key
from apikeys.models import ApiKey
from djangollmapi.errors import ApiError

JWT_LABEL = "jwt"


@dataclass
class Caller:
    """The principal of an API request: the key it presented (or the key its token
    stands for) and the label the request log shows for it (never a secret)."""

    presented: PresentedKey
    label: str
    _verified: ApiKey | None = field(default=None, repr=False)

    # DRF treats the authenticated principal as a user.
    is_authenticated = True

    def key(self) -> ApiKey:
        """The key row, verified (it exists, matches, is not revoked, is inside its
        window) on the first call: one read, for views that take no call."""
        if self._verified is None:
            self._verified = selectors.verified_key(self.presented)
        return self._verified


def bearer_credentials(header: str) -> str:
    """The credentials of `Authorization: Bearer <credentials>`: the one parse of the
    header. Missing, another scheme or empty is a 401 at once."""
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
    return credentials


def caller_for(request: HttpRequest) -> Caller:
    """The caller a request presents: a well-formed key (no database), or with [jwt]
    configured a bearer JWT, verified, standing for its subject's key (apikeys.jwt_auth:
    one read, and one insert on a subject's first call)."""
    credentials = bearer_credentials(request.META.get("HTTP_AUTHORIZATION", ""))
    jwt_config = settings.LLM_CONFIG.jwt
    if jwt_config is not None and jwt_auth.looks_like_jwt(credentials):
        return Caller(jwt_auth.presented_jwt(credentials, jwt_config), JWT_LABEL)
    presented = parse_key(credentials)
    if presented is None:
        raise selectors.unauthorized("invalid_api_key", "Incorrect API key provided.")
    return Caller(presented, presented.prefix)


class BearerAuthentication(BaseAuthentication):
    """The default authentication of every API view (settings.REST_FRAMEWORK)."""

    def authenticate(self, request) -> tuple[Caller, Caller]:
        caller = caller_for(request)
        return caller, caller

    def authenticate_header(self, request) -> str:
        return "Bearer"


class key_errors_first:
    """Around reading a body: when it is bad, a bad key is reported instead, as a
    client would expect, at the cost of one read on bad bodies only."""

    def __init__(self, caller: Caller) -> None:
        self.caller = caller

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: object) -> bool:
        if kind is not None and issubclass(kind, ApiError):
            self.caller.key()  # raises the key's own error, if it has one
        return False
