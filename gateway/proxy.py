"""A call to an upstream model, from our key to the provider's answer.

The same key checks, quota, token reservation and Job row as a local call; the web
process forwards the request itself (no worker: the provider is the device). Usage
comes from the provider's `usage`; a stream passes through chunk by chunk as it
arrives, and one that breaks ends with an SSE error event, never a silent cut.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from django.http import HttpResponse, JsonResponse

from apikeys.authentication import parse_with_key_errors_first, presented_key
from djangollmapi.middleware import log_fields
from gateway import protocol, upstream
from gateway.streaming import client_gone_probe, sse_response
from gateway.upstream import Route, UpstreamFailure
from llmjobs import services
from llmjobs.models import Job

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # estimate only when a provider reports no usage


def forward(request, kind: str, route: Route) -> HttpResponse:
    """Check, charge, record, forward; answer as the provider did (model renamed)."""
    presented = presented_key(request)
    reserve = route.upstream.reserve_tokens
    parse = lambda data: protocol.parse_upstream(kind, data, reserve)  # noqa: E731
    call = parse_with_key_errors_first(presented, parse, request.data)
    job = services.start_upstream_job(
        presented, route.model.name, route.name, kind, input_text=call.input_text, reserve_tokens=call.reserve_tokens
    )
    services.release_db_connection()
    note = log_fields(request)
    note.update(model=route.model.name, backend=route.name, request_id=str(job.id))
    try:
        response = upstream.open_response(route, kind, call.body_for(route.model.upstream_name))
    except UpstreamFailure as failure:
        fail(job, failure)
        raise
    headers = response_headers(job, response)
    if call.stream:
        stream = relay_stream(job, route, call, response, client_gone_probe(request), note)
        answer = sse_response(stream, job)
    else:
        answer = JsonResponse(answer_plain(job, route, response, note))
    for name, value in headers.items():
        answer[name] = value
    return answer


def response_headers(job: Job, response: httpx.Response) -> dict[str, str]:
    headers = {"X-Request-Id": str(job.id)}
    request_id = upstream.upstream_request_id(response)
    if request_id:
        headers["X-Upstream-Request-Id"] = request_id
    return headers


def answer_plain(job: Job, route: Route, response: httpx.Response, note: dict) -> dict[str, Any]:
    try:
        data = upstream.read_json(route, response)
    except UpstreamFailure as failure:
        fail(job, failure)
        raise
    data["model"] = route.model.name
    finish(job, route, answer_text(data), upstream.usage_numbers(data) or estimated_usage(job, 1), note)
    return data


def answer_text(data: dict[str, Any]) -> str:
    """What the Job row keeps: the answer's text (embeddings keep nothing)."""
    return choice_text(data, "message")


def delta_text(event: dict[str, Any]) -> str:
    return choice_text(event, "delta")


def choice_text(data: dict[str, Any], part: str) -> str:
    """The first choice's text: `choices[0][part].content` for chat (`message` in an
    answer, `delta` in a chunk), `choices[0].text` for completions; "" for anything else."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    holder = choice.get(part) if isinstance(choice.get(part), dict) else {}
    text = holder.get("content", choice.get("text"))
    return text if isinstance(text, str) else ""


def relay_stream(
    job: Job,
    route: Route,
    call: protocol.UpstreamCall,
    response: httpx.Response,
    client_gone: Callable[[], bool],
    note: dict,
) -> Iterator[bytes]:
    """Each provider event goes out as soon as it arrives, with our model name; the
    usage chunk we asked for is kept for the record and dropped unless the client
    asked too. Whatever stops this early (the client left) closes the provider's
    stream, which cancels its generation, and the job keeps what was streamed."""
    pieces: list[str] = []
    usage: tuple[int, int] | None = None
    ended = False
    try:
        for data in upstream.sse_data(route, response):
            if client_gone():
                note["outcome"] = "client_gone"
                return
            if data == "[DONE]":
                ended = True
                finish(job, route, "".join(pieces), usage or estimated_usage(job, len(pieces)), note)
                yield protocol.SSE_DONE
                return
            event = parse_event(route, data)
            usage = upstream.usage_numbers(event) or usage
            text = delta_text(event)
            if text:
                pieces.append(text)
            if not call.include_usage:
                if event.get("usage") and not event.get("choices"):
                    continue
                event.pop("usage", None)
            event["model"] = route.model.name
            yield protocol.sse_event(event)
        raise UpstreamFailure(502, "upstream_error", f"The stream from the provider {route.name!r} ended early.")
    except UpstreamFailure as failure:
        ended = True
        fail(job, failure)
        note["outcome"] = failure.code
        yield protocol.error_event(failure.status, failure.code, failure.message)
    finally:
        response.close()
        if not ended:
            with contextlib.suppress(Exception):
                stop_abandoned(job, usage or estimated_usage(job, len(pieces)))


def parse_event(route: Route, data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        raise UpstreamFailure(502, "upstream_error", f"The provider {route.name!r} sent an unreadable event.") from None
    if not isinstance(event, dict):
        raise UpstreamFailure(502, "upstream_error", f"The provider {route.name!r} sent an unexpected event.")
    if "error" in event:
        raise upstream.error_in_stream(route, event)
    return event


def estimated_usage(job: Job, completion_pieces: int) -> tuple[int, int]:
    """A provider that reports no usage (or a stream cut before its usage chunk) is
    charged an estimate: ~4 characters a prompt token, one token per streamed piece."""
    return -(-job.input_chars // CHARS_PER_TOKEN), completion_pieces


def finish(job: Job, route: Route, text: str, usage: tuple[int, int], note: dict) -> None:
    """Record the answer and its usage (and cost) on the job, and in the log line."""
    prompt, completion = usage
    note.update(prompt_tokens=prompt, completion_tokens=completion)
    services.finish_job(
        job.id,
        text,
        prompt,
        completion,
        store_output=job.kind != "embeddings",
        cost_usd=route.model.cost(prompt, completion),
    )


def fail(job: Job, failure: UpstreamFailure) -> None:
    services.fail_job(job.id, failure.code, failure.message, refund=failure.refund)


def stop_abandoned(job: Job, usage: tuple[int, int]) -> None:
    """The client went away mid-stream: the job ends `cancelled`, charged for what
    was streamed (the provider bills it too); the call is not refunded."""
    services.cancel_job(job.id)
    services.record_cancelled(str(job.id), *usage)
