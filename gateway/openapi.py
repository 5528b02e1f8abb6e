"""`/v1/*` in the OpenAPI schema: each view's request body (the protocol's own models,
with the `model` they are routed by), its answers and its errors, as decorators the
views wear (`@openapi.chat_completions`).

The response models describe what `gateway.protocol.responses` builds, for the schema
only: the views still answer with those dicts. An upstream model's answer is its
provider's, with our model name; the models allow the fields a provider adds.
"""

from __future__ import annotations

from typing import Any, Literal

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from pydantic import BaseModel, Field

from djangollmapi.openapi import (
    CALL_ERRORS,
    ERROR_HEADERS,
    KEY_ERRORS,
    PROVIDER_REFUSAL,
    UPSTREAM_ERRORS,
    error_responses,
    job_header,
    json_schema_of,
)
from djangollmapi.wire import StorableStr
from gateway.protocol.requests import ChatBody, CompletionBody, EmbeddingsBody, TokenizeBody

TAG = "OpenAI-compatible (/v1)"


def model_first(schema: dict[str, Any]) -> None:
    """The routed-by field leads the body's properties, as in OpenAI's reference."""
    properties = schema["properties"]
    schema["properties"] = {"model": properties.pop("model"), **properties}


ROUTED_MODEL = (
    "A local deployment or an upstream model this key may use (`GET /v1/models`); empty: `[server] default_model`."
)
LOCAL_MODEL = "A local deployment this key may use (`GET /v1/models`); empty: `[server] default_model`."


def one_text_model_first(schema: dict[str, Any]) -> None:
    """TokenizeBody's own "one of messages, prompt, input", then `model` first."""
    schema.update(TokenizeBody.model_config["json_schema_extra"])
    model_first(schema)


# Requests: the protocol's models plus `model`, which the view reads first (`model_name`).


class ChatCompletionRequest(ChatBody):
    """A chat for a local deployment, read as described. For an upstream model only
    `messages` (a non-empty array of objects), `stream`, `stream_options`, `max_tokens`
    and `max_completion_tokens` are checked; the rest goes to the provider as sent.
    Unknown fields are ignored, and `null` reads as absent."""

    model_config = {"json_schema_extra": model_first}

    model: StorableStr = Field(description=ROUTED_MODEL)


class CompletionRequest(CompletionBody):
    """A raw prompt (no chat template) for a local deployment, read as described. For an
    upstream model only `prompt` (a string or a non-empty array), `stream`,
    `stream_options`, `max_tokens` and `max_completion_tokens` are checked."""

    model_config = {"json_schema_extra": model_first}

    model: StorableStr = Field(description=ROUTED_MODEL)


class EmbeddingsRequest(EmbeddingsBody):
    """Texts to embed, on a deployment whose algorithm has `embed`. For an upstream
    model only `input` (a string or a non-empty array) is checked."""

    model_config = {"json_schema_extra": model_first}

    model: StorableStr = Field(description=ROUTED_MODEL)


class TokenizeRequest(TokenizeBody):
    """`messages` when given, else `prompt`, else `input` (one is required): tokenized
    by the model's own tokenizer as generation would feed it. Local models only."""

    model_config = {"json_schema_extra": one_text_model_first}

    model: StorableStr = Field(description=LOCAL_MODEL)


# Answers, as gateway.protocol.responses builds them.

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class TokenUsage(BaseModel):
    prompt_tokens: int = Field(description="The rendered, truncated prompt, by the model's tokenizer.")
    completion_tokens: int = Field(description="Every generated token, the end-of-text one included.")
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    """`chat.completion`: the whole answer (`stream` false)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChoice]
    usage: TokenUsage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason


class Completion(BaseModel):
    """`text_completion`: the whole answer (`stream` false)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: TokenUsage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] = Field(None, description="In the first chunk only.")
    content: str | None = Field(None, description="The tokens that came together.")


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat: the role first, then tokens as the model makes
    them, a chunk with the `finish_reason`, and with `stream_options.include_usage` a
    last chunk with no choices and the `usage` (`usage` is null in the others)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionChunkChoice]
    usage: TokenUsage | None = Field(None, description="With `stream_options.include_usage` only.")


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: FinishReason | None


class CompletionChunk(BaseModel):
    """One event of a streamed completion: as ChatCompletionChunk, with `text`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChunkChoice]
    usage: TokenUsage | None = Field(None, description="With `stream_options.include_usage` only.")


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or with `encoding_format: base64` little-endian float32.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str = Field(description="`djangollmapi` for a local deployment, else the provider's name.")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Tokens(BaseModel):
    model: str
    count: int
    tokens: list[int] | None = Field(
        description="The ids the model would be fed; null from a model that counts tokens but cannot list them."
    )


class TokenCount(BaseModel):
    model: str
    count: int


STREAM_EVENTS = {"chat": ChatCompletionChunk, "completion": CompletionChunk}


def with_stream_events(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """Postprocessing hook (settings.SPECTACULAR_SETTINGS): the chunk components the
    `text/event-stream` events refer to, which no decorator names for drf-spectacular."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    for model in STREAM_EVENTS.values():
        schema = json_schema_of(model, "serialization")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return result


def event_stream(kind: str) -> dict[str, Any]:
    """A stream's schema: one of its events, as OpenAPI 3.2 would say it with
    `itemSchema` (3.1 has no word for a stream; schemathesis reads `schema` so). Each
    event's `data` is JSON (a chunk, or an error after the 200), then `[DONE]`."""
    chunk = STREAM_EVENTS[kind].__name__
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"}, {"$ref": "#/components/schemas/ErrorBody"}]}
    return {
        "type": "object",
        "description": f"One server-sent event: `data: <{chunk}>` for each piece of the answer, then "
        "`data: [DONE]`. An error after the 200 arrives as a last `data: <ErrorBody>`. Comment lines "
        "(`: keep-alive`, and `: queued position=…` while the job waits) keep an idle stream open.",
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
                ]
            }
        },
        "required": ["data"],
    }


GENERATION_HEADERS = [*ERROR_HEADERS, job_header(200)]


def generation(operation_id: str, summary: str, request: type, answer: type, kind: str) -> Any:
    return extend_schema(
        operation_id=operation_id,
        summary=summary,
        tags=[TAG],
        request=request,
        responses={
            (200, "application/json"): OpenApiResponse(
                answer,
                "The whole answer as JSON, or with `stream: true` its tokens as they come (`text/event-stream`).",
            ),
            (200, "text/event-stream"): event_stream(kind),
            **error_responses(UPSTREAM_ERRORS),
            **PROVIDER_REFUSAL,
        },
        parameters=GENERATION_HEADERS,
    )


chat_completions = generation(
    "createChatCompletion", "Chat completion, streamed or not", ChatCompletionRequest, ChatCompletion, "chat"
)
completions = generation(
    "createCompletion", "Text completion of a raw prompt", CompletionRequest, Completion, "completion"
)

embeddings = extend_schema(
    operation_id="createEmbedding",
    summary="Embeddings of one text or many",
    tags=[TAG],
    request=EmbeddingsRequest,
    responses={200: EmbeddingList, **error_responses(UPSTREAM_ERRORS), **PROVIDER_REFUSAL},
    parameters=GENERATION_HEADERS,
)


def tokenizing(operation_id: str, summary: str, answer: type) -> Any:
    return extend_schema(
        operation_id=operation_id,
        summary=summary,
        tags=[TAG],
        request=TokenizeRequest,
        responses={200: answer, **error_responses(CALL_ERRORS)},
        parameters=GENERATION_HEADERS,
    )


tokenize = tokenizing("tokenize", "Token ids and count, by the model's tokenizer (a call, no tokens)", Tokens)
count_tokens = tokenizing("countTokens", "Token count, by the model's tokenizer (a call, no tokens)", TokenCount)

list_models = extend_schema(
    operation_id="listModels",
    summary="The models this key may use",
    tags=[TAG],
    responses={200: ModelList, **error_responses(KEY_ERRORS)},
    parameters=ERROR_HEADERS,
)

retrieve_model = extend_schema(
    operation_id="retrieveModel",
    summary="One model this key may use",
    tags=[TAG],
    responses={
        200: ModelCard,
        **error_responses((*KEY_ERRORS, 404), e404="No such model, or one this key may not use (`model_not_found`)."),
    },
    parameters=[
        OpenApiParameter("model_id", str, OpenApiParameter.PATH, description="The model's name, as listed."),
        *ERROR_HEADERS,
    ],
)
