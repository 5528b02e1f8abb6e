"""Server-sent events: a local job's followed events formatted as OpenAI stream chunks,
the response that carries them, and the probe that sees a client leave.

Tokens travel worker → the job's Redis stream → `llmjobs.follow` → here → the client,
so the first token leaves while the model is still generating. When the client goes
away (seen on the socket between reads, or as a failed write that closes this
generator) the follow is abandoned, which cancels the job: a queued one never runs, a
running one stops at its next token.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import HttpRequest, StreamingHttpResponse
from django.utils import timezone

from djangollmapi import metrics
from djangollmapi.errors import DATABASE_UNAVAILABLE, ApiError
from gateway.protocol.requests import GenerationCall
from gateway.protocol.responses import (
    SSE_DONE,
    SSE_KEEPALIVE,
    chunk_shape,
    error_event,
    finish_reason,
    response_id,
    sse_event,
)
from llmjobs import lifecycle, selectors
from llmjobs.follow import Done, Failed, Idle, Token, follow_job
from llmjobs.models import Job

log = logging.getLogger(__name__)


def client_gone_probe(request: HttpRequest) -> Callable[[], bool]:
    """A cheap check that the client closed its connection, without reading from it.

    gunicorn hands the socket to the app; a readable socket whose peek returns no
    bytes has been closed by the peer. Without gunicorn (tests' in-process client, other
    servers) only a failed write reveals a disconnect."""
    sock = request.META.get("gunicorn.socket")
    if sock is None:
        return lambda: False
    return lambda: peer_closed(sock)


def peer_closed(sock: socket.socket) -> bool:
    """True once the peer has closed: a non-blocking peek reads end-of-file. Nothing
    to read yet (or a pipelined request waiting) means it is still there. No select():
    it fails on descriptors above 1024, which a busy worker holding many streams has."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except ValueError:  # a TLS socket cannot peek: rely on failed writes
        return False
    except OSError:
        return True


def sse_response(stream: Iterator[bytes], job: Job) -> StreamingHttpResponse:
    response = StreamingHttpResponse(stream, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx must pass each event on at once
    response["X-Request-Id"] = str(job.id)
    return response


def generation_stream(
    job: Job, call: GenerationCall, timeout_s: float, client_gone: Callable[[], bool], note: dict | None = None
) -> Iterator[bytes]:
    """Chunks as the worker makes tokens, then the finish chunk, the usage chunk when
    asked for, and `[DONE]`; an error after the 200 is an SSE error event. `note`
    receives the outcome for the request's log line."""
    note = {} if note is None else note
    header = {
        "id": response_id(call.kind, job.id),
        "created": int(job.created_at.timestamp()),
        "model": job.model,
        "system_fingerprint": None,
    }
    shape = chunk_shape(call.kind)
    try:
        # Something at once, so the status and headers (X-Request-Id) reach the client
        # even while the job waits in the queue: the role chunk, or a comment.
        yield sse_event(shape.chunk(header, "", None, call.include_usage)) if shape.chat else SSE_KEEPALIVE
    except GeneratorExit:
        with contextlib.suppress(Exception):
            lifecycle.cancel(job.id)  # the client left before its job was followed
        raise
    first_token = True
    try:
        with contextlib.closing(follow_job(job, timeout_s, client_gone)) as followed:
            for event in followed:
                if isinstance(event, Token):
                    if first_token:
                        first_token = False
                        waited = (timezone.now() - job.created_at).total_seconds()
                        metrics.TIME_TO_FIRST_TOKEN.labels(job.model).observe(waited)
                    yield sse_event(shape.chunk(header, event.text, None, call.include_usage))
                elif isinstance(event, Idle):
                    yield queued_comment(job) if event.waiting else SSE_KEEPALIVE
                elif isinstance(event, Done):
                    yield from finish_chunks(call, header, event.output, note)
                    return
                elif isinstance(event, Failed):
                    yield stream_error(event.error, note)
                    return
        note["outcome"] = "client_gone"
    except (OperationalError, InterfaceError):
        yield database_down_event(job, note)
    except Exception:
        log.exception("stream of job %s failed", job.id)
        try:
            lifecycle.fail(job.id, "internal_error", "The stream failed.")
        except DatabaseError as exc:  # the client still gets its error event
            log.error("job %s could not be marked failed: %s", job.id, type(exc).__name__)
        note["outcome"] = "internal_error"
        yield error_event(500, "internal_error", "The server failed while streaming the answer.")


def database_down_event(job: Job, note: dict) -> bytes:
    """What a stream that has answered 200 says when the database goes away under it
    (its job's ending cannot be written): the 503 a plain call gets, as an SSE event,
    so the stream ends at once instead of breaking off. The row keeps its last state."""
    log.error("stream of job %s: the database is unavailable", job.id)
    note["outcome"] = "database_unavailable"
    return error_event(503, "database_unavailable", DATABASE_UNAVAILABLE)


def queued_comment(job: Job) -> bytes:
    """An SSE comment for a client whose job waits for a slot: where it stands (from
    Redis alone; a plain keep-alive once it runs)."""
    place = selectors.held_place(job)
    if place is None:
        return SSE_KEEPALIVE
    position, eta = place
    eta_text = "" if eta is None else f" eta_s={eta:g}"
    return f": queued position={position}{eta_text}\n\n".encode()


def stream_error(error: ApiError, note: dict) -> bytes:
    note["outcome"] = error.code
    return error_event(error.status, error.code, error.message)


def finish_chunks(
    call: GenerationCall, header: Mapping[str, Any], result: Mapping[str, Any], note: dict
) -> Iterator[bytes]:
    note.update(prompt_tokens=result["prompt_tokens"], completion_tokens=result["completion_tokens"])
    shape = chunk_shape(call.kind)
    yield sse_event(shape.chunk(header, None, finish_reason(result["finish_reason"]), call.include_usage))
    if call.include_usage:
        yield sse_event(shape.usage_chunk(header, result["prompt_tokens"], result["completion_tokens"]))
    yield SSE_DONE
