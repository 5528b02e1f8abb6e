"""The one generator that turns a job's events into an OpenAI server-sent-event stream.

Tokens travel worker → the job's Redis stream → here → the client, so the first token
leaves while the model is still generating. When the client goes away (seen on the
socket between reads, or as a failed write that closes this generator) the job is
cancelled: a queued one never runs, a running one stops at its next token.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import redis
from django.http import HttpRequest, StreamingHttpResponse

from djangollmapi.errors import BROKER_UNAVAILABLE, ApiError
from gateway.protocol import (
    SSE_DONE,
    SSE_KEEPALIVE,
    GenerationCall,
    error_event,
    finish_reason,
    response_id,
    sse_event,
)
from llmjobs import events, services
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


def stream_generation(
    job: Job, call: GenerationCall, timeout_s: float, client_gone: Callable[[], bool], note: dict | None = None
) -> Iterator[bytes]:
    """Chunks as the worker makes tokens, then the finish chunk, the usage chunk when
    asked for, and `[DONE]`; an error after the 200 is an SSE error event. Whatever
    stops this generator early (disconnect, failed write) cancels the job. `note`
    receives the outcome for the request's log line."""
    note = {} if note is None else note
    shape = call.chunk_shape
    header = {
        "id": response_id(call.kind, job.id),
        "created": int(job.created_at.timestamp()),
        "model": call.model,
        "system_fingerprint": None,
    }
    ended = False
    try:
        # Something at once, so the status and headers (X-Request-Id) reach the client
        # even while the job waits in the queue: the role chunk, or a comment.
        if shape.chat:
            yield sse_event(shape.chunk(header, "", None, call.include_usage))
        else:
            yield SSE_KEEPALIVE
        for event, data in events.follow(str(job.id), timeout_s, client_gone):
            if event == "token":
                yield sse_event(shape.chunk(header, data["text"], None, call.include_usage))
            elif event == "idle":
                yield SSE_KEEPALIVE
            elif event == "gone":
                log.info("client of job %s went away; cancelling", job.id)
                note["outcome"] = "client_gone"
                return
            else:
                ended = True
                yield from stream_ending(job, call, header, event, data, timeout_s, note)
                return
    except redis.RedisError:
        ended = True
        if services.fail_job(job.id, "broker_unavailable", "The job queue became unavailable."):
            note["outcome"] = "broker_unavailable"
            yield error_event(503, "broker_unavailable", BROKER_UNAVAILABLE)
        else:
            yield from ending_from_record(job, call, header, note)
    except Exception:
        ended = True
        log.exception("stream of job %s failed", job.id)
        services.fail_job(job.id, "internal_error", "The stream failed.")
        note["outcome"] = "internal_error"
        yield error_event(500, "internal_error", "The server failed while streaming the answer.")
    finally:
        if not ended:
            with contextlib.suppress(Exception):
                services.cancel_job(job.id)


def stream_ending(
    job: Job,
    call: GenerationCall,
    header: Mapping[str, Any],
    event: str,
    data: Mapping[str, Any],
    timeout_s: float,
    note: dict,
) -> Iterator[bytes]:
    if event == "done":
        yield from finish_chunks(call, header, data["output"], note)
    elif event == "error":
        yield stream_error(services.job_error(data.get("code", "job_failed"), data.get("message", ""), job.id), note)
    else:  # timeout: whoever ends the job first wins, as for a waiting request
        try:
            result = services.give_up_on_job(job, timeout_s)
        except ApiError as error:
            yield stream_error(error, note)
        else:
            yield from finish_chunks(call, header, result, note)


def ending_from_record(job: Job, call: GenerationCall, header: Mapping[str, Any], note: dict) -> Iterator[bytes]:
    try:
        result = services.recorded_output(job.id)
    except ApiError as error:
        yield stream_error(error, note)
    else:
        yield from finish_chunks(call, header, result, note)


def stream_error(error: ApiError, note: dict) -> bytes:
    note["outcome"] = error.code
    return error_event(error.status, error.code, error.message)


def finish_chunks(
    call: GenerationCall, header: Mapping[str, Any], result: Mapping[str, Any], note: dict
) -> Iterator[bytes]:
    note.update(prompt_tokens=result["prompt_tokens"], completion_tokens=result["completion_tokens"])
    shape = call.chunk_shape
    yield sse_event(shape.chunk(header, None, finish_reason(result["finish_reason"]), call.include_usage))
    if call.include_usage:
        yield sse_event(shape.usage_chunk(header, result["prompt_tokens"], result["completion_tokens"]))
    yield SSE_DONE
