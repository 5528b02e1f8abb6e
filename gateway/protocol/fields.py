"""Pieces every OpenAI request body is built of: the checks of single fields (storable
text, bounded numbers, the size limit), chat messages and prompts, and the sampling
options chat and completions share. Pure: no settings, no database."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from algorithms.base import GenerationRequest
from djangollmapi.wire import PARAM, StorableStr, WireModel, documented, over_input_limit, storable, wire_error

if TYPE_CHECKING:
    from djangollmapi.routes import LocalRoute

MAX_STOP_SEQUENCES = 4
MAX_TOKENS = 2**31 - 1  # what a job's token columns hold
MAX_EMBEDDING_INPUTS = 2048
ROLES = ("system", "developer", "user", "assistant", "tool")
ENCODING_FORMATS = ("float", "base64")

# pydantic's own error types, as /v1 reports them.
MESSAGES = {
    "missing": ("missing_parameter", f"The parameter '{PARAM}' is required."),
    "string_type": ("invalid_type", f"The parameter '{PARAM}' must be a string."),
    "int_type": ("invalid_type", f"The parameter '{PARAM}' must be an integer."),
    "float_type": ("invalid_type", f"The parameter '{PARAM}' must be a number."),
    "bool_type": ("invalid_type", f"The parameter '{PARAM}' must be true or false."),
    "dict_type": ("invalid_type", f"The parameter '{PARAM}' must be an object."),
    "model_type": ("invalid_type", f"The parameter '{PARAM}' must be an object."),
    "unstorable_text": ("invalid_value", f"The parameter '{PARAM}' must be valid Unicode without NUL characters."),
}


@dataclass(frozen=True)
class Bounds:
    """A number (or integer) in [low, high]; finite, so nan and inf are refused too.
    The OpenAPI schema shows the bounds; the check and its error stay ours."""

    low: float
    high: float | None = None

    def check(self, value: float) -> float:
        low, high = self.low, self.high
        if not (value == value and low <= value and (high is None or value <= high)):
            bound = f"between {shown(low)} and {shown(high)}" if high is not None else f"at least {shown(low)}"
            raise wire_error("invalid_value", f"The parameter '{PARAM}' must be {bound}.")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["minimum"] = self.low
        if self.high is not None:
            json_schema["maximum"] = self.high
        return json_schema


def between(low: float, high: float | None = None) -> Bounds:
    return Bounds(low, high)


def shown(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def input_too_long(chars: int, info: ValidationInfo, param: str = "") -> None:
    limit = over_input_limit(chars, info)
    if limit is not None:
        raise wire_error("input_too_long", f"The input is longer than {limit} characters.", param)


def known_role(role: Any) -> str:
    if role not in ROLES:
        raise wire_error("invalid_value", f"'{PARAM}' must be one of {', '.join(ROLES)}.")
    return role


def message_text(content: Any) -> str:
    """A string, or text parts joined (the SDK's content-part form); null for an
    assistant turn that only called tools. Images and audio are not supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return storable(content)
    if not isinstance(content, list):
        raise wire_error("invalid_type", f"'{PARAM}' must be a string or an array of text parts.")
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise wire_error("unsupported_content", "Only text content parts are supported.", f"[{index}]")
        texts.append(storable(part["text"], f"[{index}]"))
    return "".join(texts)


TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}


def role_required(schema: dict[str, Any]) -> None:
    """The schema of a message: without a `role` it is refused (`known_role`), so the
    default that lets the validator see it missing is no default to a client."""
    schema["required"] = ["role"]
    schema["properties"]["role"].pop("default", None)


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, json_schema_extra=role_required)

    role: Annotated[str, BeforeValidator(known_role), WithJsonSchema({"type": "string", "enum": list(ROLES)})] = (
        "absent"
    )
    content: Annotated[
        str,
        BeforeValidator(message_text),
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}, {"type": "null"}]}),
    ] = ""

    @model_validator(mode="before")
    @classmethod
    def an_object(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise wire_error("invalid_type", f"'{PARAM}' must be an object with 'role' and 'content'.")
        return data if "role" in data else {**data, "role": None}

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def message_list(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise wire_error("invalid_type", f"'{PARAM}' must be a non-empty array of message objects.")
    return tuple(value)


Messages = Annotated[tuple[ChatMessage, ...], BeforeValidator(message_list), documented(minItems=1)]


def transcript(messages: tuple[ChatMessage, ...]) -> str:
    """A chat as one text, `role: content` per line: what the Job row keeps and the
    input size limit measures."""
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


def one_prompt(value: Any) -> Any:
    """A string, or a list holding one string (the SDK allows lists); token arrays and
    several prompts at once are not supported."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise wire_error("invalid_type", f"'{PARAM}' must be a string.")
    return storable(value)


Prompt = Annotated[
    str,
    BeforeValidator(one_prompt),
    WithJsonSchema(
        {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]}
    ),
]


TokenCount = Annotated[int, between(1, MAX_TOKENS)]


def stop_strings(value: Any) -> Any:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise wire_error("invalid_type", f"'{PARAM}' must be a non-empty string or an array of them.")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise wire_error("invalid_value", f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.")
    return tuple(storable(stop) for stop in stops)


STOP_STRING = {"type": "string", "minLength": 1}
STOP_SCHEMA = {"anyOf": [STOP_STRING, {"type": "array", "items": STOP_STRING, "maxItems": MAX_STOP_SEQUENCES}]}


class TokenLimits(WireModel):
    max_completion_tokens: TokenCount | None = None
    max_tokens: TokenCount | None = None

    @model_validator(mode="before")
    @classmethod
    def newer_name_first(cls, data: Any) -> Any:
        """With `max_completion_tokens` given, `max_tokens` is not read at all."""
        if isinstance(data, dict) and data.get("max_completion_tokens") is not None and "max_tokens" in data:
            return {name: value for name, value in data.items() if name != "max_tokens"}
        return data

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the newer name) or `max_tokens`: reserved from the
        key's token budget and stored on the job, hence bounded."""
        return self.max_completion_tokens or self.max_tokens


class GenerationOptions(TokenLimits):
    """What our gateway reads of any generation, local or upstream."""

    stream: bool = False
    stream_options: Annotated[
        Any,
        WithJsonSchema(
            {"type": ["object", "null"], "properties": {"include_usage": {"type": ["boolean", "null"]}}},
        ),
    ] = None

    @model_validator(mode="after")
    def stream_usage(self) -> GenerationOptions:
        """`stream_options` matters (and is checked) only for a stream."""
        if not self.stream or self.stream_options is None:
            return self
        if not isinstance(self.stream_options, dict):
            raise wire_error("invalid_type", f"The parameter '{PARAM}' must be an object.", "stream_options")
        value = self.stream_options.get("include_usage")
        if value is not None and not isinstance(value, bool):
            raise wire_error("invalid_type", "'include_usage' must be true or false.", "stream_options.include_usage")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream and bool((self.stream_options or {}).get("include_usage"))


class SamplingBody(GenerationOptions):
    """How a local deployment samples, for chat and completions alike."""

    # The order in which a bad one is reported, whatever their order in the classes.
    REPORT_FIRST = (
        "max_completion_tokens",
        "max_tokens",
        "n",
        "logprobs",
        "temperature",
        "top_p",
        "stream",
        "stop",
        "seed",
        "user",
    )

    n: Annotated[int, between(1), documented(maximum=1, description="Only 1 is supported.")] = 1
    logprobs: Annotated[Any, WithJsonSchema({"enum": [False, 0, None], "description": "Not supported."})] = None
    temperature: Annotated[float, between(0, 2)] | None = None
    top_p: Annotated[float, between(0, 1)] | None = None
    stop: Annotated[tuple[str, ...], BeforeValidator(stop_strings), WithJsonSchema(STOP_SCHEMA)] = ()
    seed: Annotated[int, between(-(2**63), 2**63 - 1)] | None = None
    user: StorableStr = ""

    @field_validator("n")
    @classmethod
    def one_choice(cls, n: int) -> int:
        if n != 1:
            raise wire_error("unsupported_parameter", "Only n=1 is supported.")
        return n

    @field_validator("logprobs")
    @classmethod
    def no_logprobs(cls, logprobs: Any) -> Any:
        if logprobs not in (None, False, 0):
            raise wire_error("unsupported_parameter", "logprobs are not supported.")
        return logprobs

    def to_generation_request(self, route: LocalRoute, **source: Any) -> GenerationRequest:
        """The model's request: `max_tokens` capped by the deployment (what the budget
        reserves), `top_p` 0 meaning greedy decoding."""
        requested = self.requested_max_tokens
        temperature, top_p = self.temperature, self.top_p
        if top_p == 0:  # only the most likely token survives
            temperature, top_p = 0.0, None
        return GenerationRequest(
            max_tokens=route.max_tokens if requested is None else min(requested, route.max_tokens),
            temperature=temperature,
            top_p=top_p,
            stop=self.stop,
            seed=self.seed,
            **source,
        )
