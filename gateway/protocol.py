"""The OpenAI wire format, in one place: request bodies read strictly (a wrong type is
a 400 naming its `param`, unknown fields are ignored as OpenAI does) and the response,
chunk and list shapes the official SDKs parse. Nothing here touches the database,
Redis or a model, so a bad body costs no query and no call.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from algorithms.base import GenerationRequest
from djangollmapi.config import Deployment
from djangollmapi.errors import ERROR_TYPES, ApiError
from llmjobs.routing import resolve_deployment
from llmjobs.validation import storable_text

DEFAULT_MAX_NEW_TOKENS = 64  # TextGeneration's default cap when a deployment sets none
MAX_STOP_SEQUENCES = 4
MAX_TOKENS = 2**31 - 1  # what a job's token columns hold
MAX_EMBEDDING_INPUTS = 2048
ROLES = ("system", "developer", "user", "assistant", "tool")
ENCODING_FORMATS = ("float", "base64")
_MISSING = object()


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, code, message, param=param)


class Body:
    """Typed reads from a JSON object body; `None` counts as absent, like OpenAI."""

    def __init__(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_body", "The body must be a JSON object.")
        self.data = data

    def raw(self, name: str, required: bool = False) -> Any:
        value = self.data.get(name)
        if value is None and required:
            raise invalid(name, f"The parameter '{name}' is required.", "missing_parameter")
        return value

    def typed(self, name: str, kinds: tuple[type, ...], what: str, required: bool = False) -> Any:
        value = self.raw(name, required)
        if value is None:
            return None
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise invalid(name, f"The parameter '{name}' must be {what}.", "invalid_type")
        return value

    def string(self, name: str, required: bool = False) -> str | None:
        value = self.typed(name, (str,), "a string", required)
        if value is not None:
            check_storable(name, value)
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.typed(name, (bool,), "true or false")
        return default if value is None else value

    def number(self, name: str, low: float, high: float) -> float | None:
        value = self.typed(name, (int, float), "a number")
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise invalid(name, f"The parameter '{name}' must be between {low:g} and {high:g}.")
        return value

    def integer(self, name: str, low: int, high: int | None = None) -> int | None:
        value = self.typed(name, (int,), "an integer")
        if value is not None and (value < low or (high is not None and value > high)):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise invalid(name, f"The parameter '{name}' must be {bound}.")
        return value


def check_storable(param: str, text: str) -> None:
    if not storable_text(text):
        raise invalid(param, f"The parameter '{param}' must be valid Unicode without NUL characters.")


def check_input_size(param: str, chars: int) -> None:
    limit = settings.LLM_CONFIG.server.max_input_chars
    if chars > limit:
        raise invalid(param, f"The input is longer than {limit} characters.", "input_too_long")


# --- requests ---------------------------------------------------------------


@dataclass(frozen=True)
class GenerationCall:
    """A chat or completions request, checked and resolved to a local deployment."""

    kind: str  # "chat" | "completion"
    deployment: Deployment
    request: GenerationRequest
    stream: bool
    include_usage: bool
    input_text: str  # what the Job row keeps

    @property
    def model(self) -> str:
        return self.deployment.name

    @property
    def reserve_tokens(self) -> int:
        return self.request.max_tokens

    @property
    def chunk_shape(self) -> ChunkShape:
        return CHAT_CHUNKS if self.kind == "chat" else COMPLETION_CHUNKS

    def payload(self) -> dict[str, Any]:
        return {"request": self.request.as_payload(), "stream": self.stream}


@dataclass(frozen=True)
class EmbeddingCall:
    deployment: Deployment
    texts: list[str]
    encoding_format: str
    kind = "embeddings"
    reserve_tokens = 0  # the input is all it costs; charged when settled

    @property
    def model(self) -> str:
        return self.deployment.name

    @property
    def input_text(self) -> str:
        return "\n".join(self.texts)

    def payload(self) -> dict[str, Any]:
        return {"input": self.texts}


@dataclass(frozen=True)
class TokenizeCall:
    deployment: Deployment
    request: GenerationRequest
    input_text: str
    kind = "tokenize"
    reserve_tokens = 0

    @property
    def model(self) -> str:
        return self.deployment.name

    def payload(self) -> dict[str, Any]:
        return {"request": self.request.as_payload()}


def parse_chat(data: Any) -> GenerationCall:
    body = Body(data)
    deployment = parse_model(body)
    messages = parse_messages(body.raw("messages", required=True))
    input_text = transcript(messages)
    check_input_size("messages", len(input_text))
    max_tokens = read_max_tokens(body)
    return generation_call("chat", body, deployment, input_text, max_tokens, messages=tuple(messages))


def parse_completion(data: Any) -> GenerationCall:
    body = Body(data)
    deployment = parse_model(body)
    prompt = parse_prompt(body.raw("prompt", required=True))
    check_input_size("prompt", len(prompt))
    if body.boolean("echo"):
        raise invalid("echo", "echo is not supported.", "unsupported_parameter")
    if body.typed("suffix", (str,), "a string"):
        raise invalid("suffix", "suffix is not supported.", "unsupported_parameter")
    return generation_call("completion", body, deployment, prompt, read_max_tokens(body), prompt=prompt)


def generation_call(
    kind: str, body: Body, deployment: Deployment, input_text: str, max_tokens: int | None, **source: Any
) -> GenerationCall:
    """The sampling parameters both endpoints share."""
    if body.integer("n", 1) not in (None, 1):
        raise invalid("n", "Only n=1 is supported.", "unsupported_parameter")
    if body.raw("logprobs") not in (None, False, 0):
        raise invalid("logprobs", "logprobs are not supported.", "unsupported_parameter")
    temperature = body.number("temperature", 0, 2)
    top_p = body.number("top_p", 0, 1)
    if top_p == 0:  # only the most likely token survives: greedy decoding
        temperature, top_p = 0.0, None
    stream = body.boolean("stream")
    request = GenerationRequest(
        max_tokens=capped_max_tokens(deployment, max_tokens),
        temperature=temperature,
        top_p=top_p,
        stop=parse_stop(body.raw("stop")),
        seed=body.integer("seed", -(2**63), 2**63 - 1),
        **source,
    )
    body.string("user")
    return GenerationCall(kind, deployment, request, stream, stream and parse_include_usage(body), input_text)


def read_max_tokens(body: Body) -> int | None:
    """`max_completion_tokens` (the newer name) or `max_tokens`, bounded: it is reserved
    from the key's token budget and stored on the job."""
    return body.integer("max_completion_tokens", 1, MAX_TOKENS) or body.integer("max_tokens", 1, MAX_TOKENS)


def parse_model(body: Body) -> Deployment:
    """A local deployment; an upstream model here means an operation only local
    models offer (tokenize), as the views route upstream calls before parsing."""
    name = body.string("model", required=True)
    if settings.LLM_CONFIG.upstream_for(name):
        message = f"The model {name!r} is served upstream; this needs a local model."
        raise ApiError(400, "unsupported_operation", message, param="model")
    return resolve_deployment(name)


@dataclass(frozen=True)
class UpstreamCall:
    """A request for a provider's model: checked only as far as we need it (model,
    the input, stream flags, max_tokens for the token budget); everything else is the
    provider's business and goes through untouched."""

    kind: str
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


UPSTREAM_INPUTS = {"chat": "messages", "completion": "prompt", "embeddings": "input"}


def parse_upstream(kind: str, data: Any, default_reserve: int) -> UpstreamCall:
    body = Body(data)
    body.string("model", required=True)
    field_name = UPSTREAM_INPUTS[kind]
    value = body.raw(field_name, required=True)
    if kind == "chat":
        # Only the shape: roles and content parts (images, audio) are the provider's to judge.
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            raise invalid("messages", "'messages' must be a non-empty array of message objects.", "invalid_type")
    elif not isinstance(value, (str, list)) or not value:
        raise invalid(field_name, f"'{field_name}' must be a string or a non-empty array.", "invalid_type")
    input_text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    check_storable(field_name, input_text)
    check_input_size(field_name, len(input_text))
    stream = kind != "embeddings" and body.boolean("stream")
    max_tokens = read_max_tokens(body)
    reserve = 0 if kind == "embeddings" else (max_tokens or default_reserve)
    include_usage = stream and parse_include_usage(body)
    return UpstreamCall(kind, data, stream, include_usage, reserve, input_text)


def capped_max_tokens(deployment: Deployment, requested: int | None) -> int:
    """The deployment's `max_new_tokens` is both the default and the cap: a request for
    more gets at most that many (finish_reason says `length`), as the key's token budget
    reserves exactly this number."""
    cap = deployment_max_tokens(deployment)
    return cap if requested is None else min(requested, cap)


def deployment_max_tokens(deployment: Deployment) -> int:
    value = deployment.options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_NEW_TOKENS


def parse_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages", "'messages' must be a non-empty array of message objects.", "invalid_type")
    return [parse_message(message, f"messages[{index}]") for index, message in enumerate(value)]


def parse_message(message: Any, param: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise invalid(param, f"'{param}' must be an object with 'role' and 'content'.", "invalid_type")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{param}.role", f"'{param}.role' must be one of {', '.join(ROLES)}.")
    content = message_text(message.get("content"), f"{param}.content")
    return {"role": role, "content": content}


def transcript(messages: list[dict[str, str]]) -> str:
    """A chat as one text, `role: content` per line: what the Job row keeps and the
    input size limit measures."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def message_text(content: Any, param: str) -> str:
    """A string, or text parts joined (the SDK's content-part form); null for an
    assistant turn that only called tools. Images and audio are not supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        check_storable(param, content)
        return content
    if not isinstance(content, list):
        raise invalid(param, f"'{param}' must be a string or an array of text parts.", "invalid_type")
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"{param}[{index}]", "Only text content parts are supported.", "unsupported_content")
        check_storable(f"{param}[{index}]", part["text"])
        texts.append(part["text"])
    return "".join(texts)


def parse_prompt(value: Any) -> str:
    """A string, or a list holding one string (the SDK allows lists); token arrays and
    several prompts at once are not supported."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise invalid("prompt", "'prompt' must be a string.", "invalid_type")
    check_storable("prompt", value)
    return value


def parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", "'stop' must be a non-empty string or an array of them.", "invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.")
    for stop in stops:
        check_storable("stop", stop)
    return tuple(stops)


def parse_include_usage(body: Body) -> bool:
    options = body.typed("stream_options", (dict,), "an object")
    if not options:
        return False
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise invalid("stream_options.include_usage", "'include_usage' must be true or false.", "invalid_type")
    return bool(value)


def parse_embeddings(data: Any) -> EmbeddingCall:
    body = Body(data)
    deployment = parse_model(body)
    texts = parse_embedding_input(body.raw("input", required=True))
    check_input_size("input", sum(map(len, texts)))
    encoding_format = body.string("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise invalid("encoding_format", "'encoding_format' must be 'float' or 'base64'.")
    if body.raw("dimensions") is not None:
        raise invalid("dimensions", "Choosing the dimensions is not supported.", "unsupported_parameter")
    body.string("user")
    return EmbeddingCall(deployment, texts, encoding_format)


def parse_embedding_input(value: Any) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise invalid("input", "'input' must be a string or a non-empty array of strings.", "invalid_type")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise invalid("input", f"At most {MAX_EMBEDDING_INPUTS} inputs per request.")
    for index, text in enumerate(texts):
        if not text:
            raise invalid(f"input[{index}]", "An input must not be empty.")
        check_storable(f"input[{index}]", text)
    return texts


def parse_tokenize(data: Any) -> TokenizeCall:
    """A prompt string (`prompt`, or `input` as seed 001's gateway sends it) or a whole
    chat request (`messages`), tokenized as generation would feed it."""
    body = Body(data)
    deployment = parse_model(body)
    if body.raw("messages") is not None:
        messages = parse_messages(body.raw("messages"))
        input_text = transcript(messages)
        request = GenerationRequest(max_tokens=1, messages=tuple(messages))
    else:
        name = "prompt" if body.raw("prompt") is not None else "input"
        input_text = parse_prompt(body.raw(name, required=True)) if name == "prompt" else body.string(name, True)
        request = GenerationRequest(max_tokens=1, prompt=input_text)
    check_input_size("prompt", len(input_text))
    return TokenizeCall(deployment, request, input_text)


# --- responses --------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(value: str) -> str:
    """`cancelled` never reaches a client that is still there; anything odd reads as stop."""
    return value if value in ("stop", "length") else "stop"


def chat_completion(response_id: str, created: int, model: str, result: Mapping[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": result["text"], "refusal": None}
    return completion_body("chat.completion", response_id, created, model, result, {"message": message})


def text_completion(response_id: str, created: int, model: str, result: Mapping[str, Any]) -> dict[str, Any]:
    return completion_body("text_completion", response_id, created, model, result, {"text": result["text"]})


def completion_body(
    kind: str, response_id: str, created: int, model: str, result: Mapping[str, Any], answer: dict[str, Any]
) -> dict[str, Any]:
    """The non-streamed body both endpoints share; only the answer's field differs."""
    choice = {"index": 0, **answer, "logprobs": None, "finish_reason": finish_reason(result["finish_reason"])}
    return {
        "id": response_id,
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [choice],
        "usage": usage(result["prompt_tokens"], result["completion_tokens"]),
    }


@dataclass(frozen=True)
class ChunkShape:
    """How one endpoint's stream chunks look: chat deltas or completion text."""

    object: str
    chat: bool

    def chunk(self, header: Mapping[str, Any], text: str | None, finish: str | None, with_usage: bool) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            if text == "" and finish is None:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {**header, "object": self.object, "choices": [choice]}
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, header: Mapping[str, Any], prompt_tokens: int, completion_tokens: int) -> dict:
        return {**header, "object": self.object, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


CHAT_CHUNKS = ChunkShape("chat.completion.chunk", chat=True)
COMPLETION_CHUNKS = ChunkShape("text_completion", chat=False)


def response_id(kind: str, job_id: Any) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + job_id.hex


def sse_event(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


SSE_DONE = sse_event("[DONE]")
SSE_KEEPALIVE = b": keep-alive\n\n"


def error_event(status: int, code: str, message: str) -> bytes:
    """An error inside a stream that already answered 200: the OpenAI SDKs raise
    `APIError` when a chunk carries an `error` object."""
    error = {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "code": code, "param": None}
    return sse_event({"error": error})


def embedding_list(model: str, vectors: list[list[float]], encoding_format: str, prompt_tokens: int) -> dict:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": encode_vector(vector, encoding_format)}
            for index, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """`base64` is little-endian float32, what the SDKs decode (and send by default)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def model_card(name: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}
