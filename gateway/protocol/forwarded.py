"""The OpenAI request bodies for an upstream provider's model: read only as far as we
need them (the input for the Job row and the size limit, the stream flags, max_tokens
for the token budget); everything else is the provider's to judge and goes through
untouched. Pure: no settings, no database."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationInfo

from djangollmapi.wire import PARAM, parse_body, storable, wire_error
from gateway.protocol.fields import MESSAGES, GenerationOptions, TokenLimits, input_too_long
from llmjobs.models import Job

UPSTREAM_INPUTS = {Job.Kind.CHAT: "messages", Job.Kind.COMPLETION: "prompt", Job.Kind.EMBEDDINGS: "input"}


def provider_input(value: Any, info: ValidationInfo) -> Any:
    """Only the shape: roles and content parts (images, audio) are the provider's to judge."""
    if info.field_name == "messages":
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            raise wire_error("invalid_type", f"'{PARAM}' must be a non-empty array of message objects.")
    elif not isinstance(value, (str, list)) or not value:
        raise wire_error("invalid_type", f"'{PARAM}' must be a string or a non-empty array.")
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    input_too_long(len(storable(text)), info)
    return text


ProviderInput = Annotated[str, BeforeValidator(provider_input)]


class UpstreamChatBody(GenerationOptions):
    REPORT_FIRST = ("messages", "stream", "max_completion_tokens", "max_tokens")

    messages: ProviderInput


class UpstreamCompletionBody(GenerationOptions):
    REPORT_FIRST = ("prompt", "stream", "max_completion_tokens", "max_tokens")

    prompt: ProviderInput


class UpstreamEmbeddingsBody(TokenLimits):
    """No stream, and no generated tokens to reserve; `max_tokens` is still checked."""

    REPORT_FIRST = ("input",)

    input: ProviderInput


UPSTREAM_BODIES = {
    Job.Kind.CHAT: UpstreamChatBody,
    Job.Kind.COMPLETION: UpstreamCompletionBody,
    Job.Kind.EMBEDDINGS: UpstreamEmbeddingsBody,
}


@dataclass(frozen=True)
class UpstreamCall:
    """A request for a provider's model: checked only as far as we need it (the input,
    stream flags, max_tokens for the token budget); everything else is the provider's
    business and goes through untouched."""

    kind: Job.Kind
    data: dict[str, Any]
    stream: bool
    include_usage: bool
    reserve_tokens: int
    input_text: str

    def body_for(self, upstream_name: str) -> dict[str, Any]:
        """The body the provider gets: its own model name, and in a stream always the
        usage chunk (it is how tokens are counted; stripped again if unasked)."""
        body = {**self.data, "model": upstream_name}
        if self.stream:
            options = self.data.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return body


def parse_upstream(kind: Job.Kind, data: Any, default_reserve: int, max_input_chars: int) -> UpstreamCall:
    body = parse_body(UPSTREAM_BODIES[kind], data, MESSAGES, max_input_chars=max_input_chars)
    input_text = getattr(body, UPSTREAM_INPUTS[kind])
    if kind == Job.Kind.EMBEDDINGS:
        return UpstreamCall(kind, data, False, False, 0, input_text)
    reserve = body.requested_max_tokens or default_reserve
    return UpstreamCall(kind, data, body.stream, body.include_usage, reserve, input_text)
