"""The OpenAPI schema of the API (drf-spectacular: `/api/schema/`, Swagger UI at
`/api/docs/`), as the views' `extend_schema` decorators and this module describe it:

- which endpoints it shows: `/api/`, `/analyze/`, `/v1/` and `/extras/`, with the
  optional trailing slash of the regex routes dropped (`/v1/chat/completions`). The
  probes, `/metrics` and the admin are plain Django views, never part of it;
- request and response bodies from pydantic models: a request is described as its
  model validates (`mode="validation"`), a response as the model would serialize it;
- the bearer key (or JWT) as the security scheme of every operation;
- the one error body (`djangollmapi.errors`) and what each status means.

Nothing here runs on a request but the schema's: the views answer as before.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.contrib.pydantic import PydanticExtension
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import ResolvedComponent
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from pydantic import BaseModel, Field
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, model_json_schema

from djangollmapi.errors import ERROR_TYPES
from djangollmapi.middleware import API_PREFIXES

REF_TEMPLATE = "#/components/schemas/{model}"


def public_api_only(endpoints: list[tuple]) -> list[tuple]:
    """Preprocessing hook: the API's endpoints only, each at its clean path. A regex
    route that tolerates a trailing slash (`^v1/models/?$`) is shown without it, as the
    SDKs call it."""
    shown = []
    for path, path_regex, method, callback in endpoints:
        if not path.startswith(API_PREFIXES):
            continue
        if path_regex.endswith("/?$"):
            path = path.rstrip("/")
        shown.append((path, path_regex, method, callback))
    return shown


# Routes that serve an endpoint again under another client's name: one view, so one
# decorator, but each operation needs its own id.
ALIASES = {
    "/analyze/": ("analyze", "The seed's other name for `POST /api/`."),
    "/extras/tokenize/count": ("countTokensExtras", "Seed 001's name for `POST /v1/tokenize/count`."),
}


class ApiSchema(AutoSchema):
    """drf-spectacular's AutoSchema (settings.REST_FRAMEWORK), naming the aliases."""

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is not None and self.path in ALIASES:
            operation["operationId"], operation["description"] = ALIASES[self.path]
        return operation


class TitlelessJsonSchema(GenerateJsonSchema):
    """pydantic's JSON Schema without a `title` per field (the field's name again), and
    for an answer without the defaults: a field with one (`None`) is one that an answer
    may leave out, which its `required` list already says."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def default_schema(self, schema: Any) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        if self.mode == "serialization":
            json_schema.pop("default", None)
        return json_schema


def json_schema_of(model: type[BaseModel], mode: str) -> dict[str, Any]:
    """`model`'s JSON Schema, its sub-models referenced as components (`$defs` moved
    out by the caller)."""
    return model_json_schema(model, ref_template=REF_TEMPLATE, mode=mode, schema_generator=TitlelessJsonSchema)


class PydanticBodies(PydanticExtension):
    """drf-spectacular's pydantic support, with a request read as pydantic validates it:
    what a client may send (`null` for an optional field, defaults not required)."""

    priority = 1

    def map_serializer(self, auto_schema, direction):
        mode = "validation" if direction == "request" else "serialization"
        schema = json_schema_of(self.target, mode)
        for name, sub_schema in schema.pop("$defs", {}).items():
            component = ResolvedComponent(name=name, type=ResolvedComponent.SCHEMA, object=name, schema=sub_schema)
            auto_schema.registry.register_on_missing(component)
        return schema


class BearerKeyScheme(OpenApiAuthenticationExtension):
    """`apikeys.authentication.BearerAuthentication` as the schema's security scheme."""

    target_class = "apikeys.authentication.BearerAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "dla_<prefix>_<secret>, or a JWT where [jwt] is configured",
            "description": "An API key issued in the admin or by `manage.py createapikey`.",
        }


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(json_schema_extra={"enum": sorted(set(ERROR_TYPES.values()))})
    code: str = Field(description="Stable: what a client should branch on.")
    param: str | None = Field(description="The request field at fault, e.g. `messages[0].role`.")


class ErrorBody(BaseModel):
    """Every error, whatever the endpoint: the OpenAI shape the SDKs raise from."""

    error: ErrorDetail


# What each status means, for every endpoint that can answer it (README "Errors").
ERROR_STATUSES = {
    400: "The body is not what this endpoint reads (`param` names the field), or the model cannot do this "
    "(`unsupported_operation`).",
    401: "No key, not a bearer header, an unknown or revoked key, or a JWT that fails (`WWW-Authenticate: Bearer`).",
    403: "The key is outside its validity window (`key_not_yet_valid`, `key_expired`) or may not use this model "
    "(`model_not_allowed`).",
    404: "No such model (`model_not_found`) or job (`job_not_found`).",
    409: "The job was cancelled before it answered (`cancelled`).",
    411: "A chunked body without a Content-Length (`length_required`).",
    413: "The body is larger than `[server] max_body_bytes` (`request_too_large`).",
    415: "The body is not JSON (`unsupported_media_type`).",
    429: "The key's calls are used up (`quota_exhausted`), its token budget cannot cover the call's reservation "
    "(`token_budget_exhausted`), a period budget would be crossed (`budget_exhausted`), or a rate limit is reached "
    "(`rate_limit_exceeded`), or the model's queue is full (`queue_full`); `Retry-After` says when there is room.",
    500: "The model raised (`job_failed`), its worker died (`worker_lost`), or the server failed (`internal_error`).",
    502: "The upstream provider could not be reached, failed, or sent too much (`upstream_unreachable`, "
    "`upstream_error`, `upstream_response_too_large`).",
    503: "Retry later: no worker serves the model, its model failed to load, the key's rate "
    "limits cannot be checked, or the database, broker or provider is unavailable.",
    504: "The model (`job_timeout`) or the provider (`upstream_timeout`) did not answer in time.",
}

# Any view, before it reads anything: the key, then the database that checks it.
KEY_ERRORS = (401, 403, 500, 503)
# Any view that reads a JSON body.
BODY_ERRORS = (400, 411, 413, 415)
# A call taken from the key's quota and run on a local model.
CALL_ERRORS = (*KEY_ERRORS, *BODY_ERRORS, 404, 409, 429, 504)
# A call that may go to an upstream provider instead.
UPSTREAM_ERRORS = (*CALL_ERRORS, 502)


def error_responses(statuses: tuple[int, ...], **described: str) -> dict[int | str, OpenApiResponse]:
    """The error answers of an operation: `statuses` with their common meaning (or the
    one given as `described`, e.g. `e404="..."`)."""
    responses: dict[int | str, OpenApiResponse] = {}
    for status in sorted(set(statuses)):
        responses[status] = OpenApiResponse(ErrorBody, described.get(f"e{status}", ERROR_STATUSES[status]))
    return responses


PROVIDER_REFUSAL = {
    "4XX": OpenApiResponse(
        ErrorBody,
        "An upstream provider's own refusal, in our shape with its status and code (upstream models only).",
    )
}

CHALLENGE_HEADER = OpenApiParameter(
    "WWW-Authenticate", str, OpenApiParameter.HEADER, response=[401], description="`Bearer`"
)
RETRY_AFTER_HEADER = OpenApiParameter(
    "Retry-After",
    int,
    OpenApiParameter.HEADER,
    response=[429, 503],
    description="Seconds to wait, when known (a full queue, a model that failed to load, a provider's own).",
)
RATE_LIMIT_HEADERS = [
    OpenApiParameter(
        f"x-ratelimit-{part}-{kind}",
        str if part == "reset" else int,
        OpenApiParameter.HEADER,
        response=[200, 429],
        description=f"Calls (POSTs) of a key with rate limits: its {kind} per minute, {meaning} (OpenAI's header).",
    )
    for kind in ("requests", "tokens")
    for part, meaning in (
        ("limit", "the limit"),
        ("remaining", "what is left"),
        ("reset", "until the bucket is full again, e.g. `1s`, `6m0s`"),
    )
]
ERROR_HEADERS = [CHALLENGE_HEADER, RETRY_AFTER_HEADER, *RATE_LIMIT_HEADERS]


def job_header(*statuses: int) -> OpenApiParameter:
    """`X-Request-Id`: the id of the job (the usage record) an answer came from."""
    return OpenApiParameter(
        "X-Request-Id",
        str,
        OpenApiParameter.HEADER,
        response=list(statuses),
        required=True,
        description="The job's id: quote it when asking about this call.",
    )
