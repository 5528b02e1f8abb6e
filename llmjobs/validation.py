"""Request bodies for the seed-compatible `/api/` endpoints, checked without the
database so a bad body costs no query and no call."""

from __future__ import annotations

from typing import Any, NamedTuple

from django.conf import settings

from djangollmapi.config import Deployment
from djangollmapi.errors import ApiError
from llmjobs.routing import resolve_deployment


class RunRequest(NamedTuple):
    text: str
    deployment: Deployment


def parse_run_request(data: Any) -> RunRequest:
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_body", "The body must be a JSON object.")
    text = data.get("text")
    if text is None:
        raise ApiError(400, "missing_text", "The field 'text' is required.", param="text")
    if not isinstance(text, str):
        raise ApiError(400, "invalid_text", "The field 'text' must be a string.", param="text")
    if not storable_text(text):
        raise ApiError(
            400, "invalid_text", "The field 'text' must be valid Unicode without NUL characters.", param="text"
        )
    limit = settings.LLM_CONFIG.server.max_input_chars
    if len(text) > limit:
        raise ApiError(400, "text_too_long", f"The field 'text' is longer than {limit} characters.", param="text")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "invalid_model", "The field 'model' must be a string.", param="model")
    return RunRequest(text, resolve_deployment(model))


def storable_text(text: str) -> bool:
    """NUL and lone surrogates are valid in JSON strings but in no database column."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
