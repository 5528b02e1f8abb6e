"""The seed-compatible `/api/` body, `{"text": ..., "model": ...}`, typed (pydantic,
strict) and checked without the database, so a bad body costs no query and no call.
Pure: the size limit arrives as an argument."""

from __future__ import annotations

from typing import Any, NamedTuple

from pydantic import ValidationInfo, field_validator

from djangollmapi.wire import PARAM, StorableStr, WireModel, over_input_limit, parse_body, wire_error
from llmjobs.models import Job

# pydantic's error types (and the shared text check), as `/api/` has always named them.
MESSAGES = {
    "missing:text": ("missing_text", "The field 'text' is required."),
    "string_type:text": ("invalid_text", "The field 'text' must be a string."),
    "unstorable_text:text": ("invalid_text", "The field 'text' must be valid Unicode without NUL characters."),
    "string_type:model": ("invalid_model", "The field 'model' must be a string."),
}


class RunBody(WireModel):
    text: StorableStr
    model: str | None = None

    @field_validator("text")
    @classmethod
    def within_the_size_limit(cls, text: str, info: ValidationInfo) -> str:
        limit = over_input_limit(len(text), info)
        if limit is not None:
            raise wire_error("text_too_long", f"The field '{PARAM}' is longer than {limit} characters.")
        return text


class RunRequest(NamedTuple):
    """A checked `/api/` call, in the shape the job lifecycle takes."""

    text: str
    model: str | None
    kind = Job.Kind.RUN
    reserve_tokens = 0  # charged what it used, when settled

    @property
    def input_text(self) -> str:
        return self.text

    def payload(self) -> str:
        return self.text


def parse_run_request(data: Any, max_input_chars: int) -> RunRequest:
    body = parse_body(RunBody, data, MESSAGES, max_input_chars=max_input_chars)
    return RunRequest(body.text, body.model)
