"""The OpenAI request bodies for our own deployments, typed (pydantic, strict): a
wrong type is a 400 naming its `param` (`messages[0].role`), a `null` counts as absent
and unknown fields are ignored, as OpenAI does. The model name is read first and
alone (`model_name`): it decides the route, and each body is parsed for the route it
was sent to, with the route's limits.

Pure: no settings, no database, no Redis, no model. Limits from the config arrive as
arguments, so a bad body costs no query and no call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from algorithms.base import GenerationRequest
from djangollmapi.wire import PARAM, StorableStr, WireModel, documented, parse_body, storable, wire_error
from gateway.protocol.fields import (
    ENCODING_FORMATS,
    MAX_EMBEDDING_INPUTS,
    MESSAGES,
    ChatMessage,
    Messages,
    Prompt,
    SamplingBody,
    input_too_long,
    transcript,
)
from llmjobs.models import Job

if TYPE_CHECKING:
    from djangollmapi.routes import LocalRoute


class ModelName(WireModel):
    """Read first, alone: the name decides the route, and the route how to read the rest."""

    model: StorableStr


def model_name(data: Any) -> str:
    return parse_body(ModelName, data, MESSAGES).model


class ChatBody(SamplingBody):
    """`/v1/chat/completions` for a local deployment: the chat, and how to sample."""

    REPORT_FIRST = ("messages", *SamplingBody.REPORT_FIRST)

    messages: Messages

    @field_validator("messages")
    @classmethod
    def within_the_size_limit(cls, messages: tuple[ChatMessage, ...], info: ValidationInfo) -> tuple:
        input_too_long(len(transcript(messages)), info)
        return messages


class CompletionBody(SamplingBody):
    """`/v1/completions` for a local deployment: the prompt, and how to sample."""

    REPORT_FIRST = ("prompt", "echo", "suffix", *SamplingBody.REPORT_FIRST)

    prompt: Prompt
    echo: Annotated[bool, documented(enum=[False], description="Not supported.")] = False
    suffix: Annotated[str, documented(enum=[""], description="Not supported.")] = ""

    @field_validator("prompt")
    @classmethod
    def within_the_size_limit(cls, prompt: str, info: ValidationInfo) -> str:
        input_too_long(len(prompt), info)
        return prompt

    @field_validator("echo")
    @classmethod
    def no_echo(cls, echo: bool) -> bool:
        if echo:
            raise wire_error("unsupported_parameter", "echo is not supported.")
        return echo

    @field_validator("suffix")
    @classmethod
    def no_suffix(cls, suffix: str) -> str:
        if suffix:
            raise wire_error("unsupported_parameter", "suffix is not supported.")
        return suffix


@dataclass(frozen=True)
class GenerationCall:
    """A chat or completions request for a local deployment, checked."""

    kind: Job.Kind  # CHAT or COMPLETION
    request: GenerationRequest
    stream: bool
    include_usage: bool
    input_text: str  # what the Job row keeps

    @property
    def reserve_tokens(self) -> int:
        return self.request.max_tokens

    def payload(self) -> dict[str, Any]:
        return {"request": self.request.as_payload(), "stream": self.stream}


def parse_chat(data: Any, route: LocalRoute, max_input_chars: int) -> GenerationCall:
    body = parse_body(ChatBody, data, MESSAGES, max_input_chars=max_input_chars)
    request = body.to_generation_request(route, messages=tuple(m.as_dict() for m in body.messages))
    return GenerationCall(Job.Kind.CHAT, request, body.stream, body.include_usage, transcript(body.messages))


def parse_completion(data: Any, route: LocalRoute, max_input_chars: int) -> GenerationCall:
    body = parse_body(CompletionBody, data, MESSAGES, max_input_chars=max_input_chars)
    request = body.to_generation_request(route, prompt=body.prompt)
    return GenerationCall(Job.Kind.COMPLETION, request, body.stream, body.include_usage, body.prompt)


def parse_local(kind: Job.Kind, data: Any, route: LocalRoute, max_input_chars: int) -> Any:
    """The body of a generation or embeddings call to a local deployment, read for
    what `kind` asks of it."""
    if kind == Job.Kind.EMBEDDINGS:
        return parse_embeddings(data, max_input_chars)
    parse = parse_chat if kind == Job.Kind.CHAT else parse_completion
    return parse(data, route, max_input_chars)


def embedding_inputs(value: Any) -> Any:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise wire_error("invalid_type", f"'{PARAM}' must be a string or a non-empty array of strings.")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise wire_error("invalid_value", f"At most {MAX_EMBEDDING_INPUTS} inputs per request.")
    for index, text in enumerate(texts):
        if not text:
            raise wire_error("invalid_value", "An input must not be empty.", f"[{index}]")
        storable(text, f"[{index}]")
    return tuple(texts)


EMBEDDING_INPUT = {"type": "string", "minLength": 1}


class EmbeddingsBody(WireModel):
    input: Annotated[
        tuple[str, ...],
        BeforeValidator(embedding_inputs),
        WithJsonSchema(
            {
                "anyOf": [
                    EMBEDDING_INPUT,
                    {"type": "array", "items": EMBEDDING_INPUT, "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS},
                ]
            }
        ),
    ]
    encoding_format: Annotated[StorableStr, documented(enum=list(ENCODING_FORMATS))] = Field(
        "", validate_default=True, json_schema_extra={"default": "float"}
    )
    dimensions: Annotated[Any, WithJsonSchema({"type": "null", "description": "Not supported."})] = None
    user: StorableStr = ""

    @field_validator("input")
    @classmethod
    def within_the_size_limit(cls, texts: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        input_too_long(sum(map(len, texts)), info)
        return texts

    @field_validator("encoding_format")
    @classmethod
    def known_format(cls, value: str) -> str:
        value = value or "float"  # absent or empty: floats
        if value not in ENCODING_FORMATS:
            raise wire_error("invalid_value", "'encoding_format' must be 'float' or 'base64'.")
        return value

    @field_validator("dimensions")
    @classmethod
    def no_dimensions(cls, value: Any) -> Any:
        if value is not None:
            raise wire_error("unsupported_parameter", "Choosing the dimensions is not supported.")
        return value


@dataclass(frozen=True)
class EmbeddingCall:
    texts: tuple[str, ...]
    encoding_format: str
    kind = Job.Kind.EMBEDDINGS
    reserve_tokens = 0  # the input is all it costs; charged when settled
    stream = False  # embeddings come whole

    @property
    def input_text(self) -> str:
        return "\n".join(self.texts)

    def payload(self) -> dict[str, Any]:
        return {"input": list(self.texts)}


def parse_embeddings(data: Any, max_input_chars: int) -> EmbeddingCall:
    body = parse_body(EmbeddingsBody, data, MESSAGES, max_input_chars=max_input_chars)
    return EmbeddingCall(body.input, body.encoding_format)


class TokenizeBody(WireModel):
    """A prompt string (`prompt`, or `input` as seed 001's gateway sends it) or a whole
    chat (`messages`), tokenized as generation would feed it."""

    # One of the three is required (`some_text`).
    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["messages"]}, {"required": ["prompt"]}, {"required": ["input"]}]}
    )

    messages: Messages | None = None
    prompt: Prompt | None = None
    input: StorableStr | None = None

    @model_validator(mode="before")
    @classmethod
    def only_what_is_read(cls, data: Any) -> Any:
        """`messages` when given, else `prompt`, else `input`: the others are not read."""
        if not isinstance(data, dict):
            return data
        for name, unread in (("messages", ("prompt", "input")), ("prompt", ("input",))):
            if data.get(name) is not None:
                return {key: value for key, value in data.items() if key not in unread}
        return data

    @model_validator(mode="after")
    def some_text(self, info: ValidationInfo) -> TokenizeBody:
        if self.messages is None and self.prompt is None and self.input is None:
            raise wire_error("missing_parameter", "The parameter 'input' is required.", "input")
        input_too_long(len(self.text), info, "prompt")
        return self

    @property
    def text(self) -> str:
        if self.messages is not None:
            return transcript(self.messages)
        return self.prompt if self.prompt is not None else self.input or ""


@dataclass(frozen=True)
class TokenizeCall:
    request: GenerationRequest
    input_text: str
    kind = Job.Kind.TOKENIZE
    reserve_tokens = 0

    def payload(self) -> dict[str, Any]:
        return {"request": self.request.as_payload()}


def parse_tokenize(data: Any, max_input_chars: int) -> TokenizeCall:
    body = parse_body(TokenizeBody, data, MESSAGES, max_input_chars=max_input_chars)
    if body.messages is not None:
        request = GenerationRequest(max_tokens=1, messages=tuple(m.as_dict() for m in body.messages))
    else:
        request = GenerationRequest(max_tokens=1, prompt=body.text)
    return TokenizeCall(request, body.text)
