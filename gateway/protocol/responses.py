"""The OpenAI response shapes the official SDKs parse: completions, stream chunks
(chat deltas or completion text, the usage chunk), server-sent events, embedding
lists and model cards. Pure: it formats what it is given."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from djangollmapi.errors import ERROR_TYPES
from llmjobs.models import Job


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


def chunk_shape(kind: Job.Kind) -> ChunkShape:
    return CHAT_CHUNKS if kind == Job.Kind.CHAT else COMPLETION_CHUNKS


def completion(kind: Job.Kind, response_id: str, created: int, model: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The non-streamed answer of chat or completions."""
    build = chat_completion if kind == Job.Kind.CHAT else text_completion
    return build(response_id, created, model, result)


def response_id(kind: Job.Kind, job_id: Any) -> str:
    return ("chatcmpl-" if kind == Job.Kind.CHAT else "cmpl-") + job_id.hex


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
