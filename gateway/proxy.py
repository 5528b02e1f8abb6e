"""A call to an upstream model, from our key to the provider's answer.

The same admission, quota, token reservation and Job row as a local call (the job
lifecycle); the web process forwards the request itself (no worker: the provider is
the device). Usage comes from the provider's `usage`; a stream passes through chunk by
chunk as it arrives, once its first event has (so a stream that fails before it fails
like a plain call, and a route may try its next backend, `gateway.fallbacks`); one
that breaks later ends with an SSE error event, never a silent cut. What a provider's
failure costs, and what its answer is charged, is the lifecycle's billing policy; what
it says of the provider, its circuit breaker's (`gateway.breaker`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from django.db import InterfaceError, OperationalError
from django.http import HttpResponseBase, JsonResponse

from djangollmapi import metrics
from djangollmapi.middleware import log_fields, note_job
from djangollmapi.routes import UpstreamRoute
from gateway import breaker, cache, providers, upstream
from gateway.protocol.forwarded import UpstreamCall
from gateway.protocol.responses import SSE_DONE, error_event, sse_event
from gateway.streaming import client_gone_probe, database_down_event, sse_response
from gateway.upstream import UpstreamFailure
from llmjobs import upstreamjobs
from llmjobs.models import Job

log = logging.getLogger(__name__)


def forward(request, route: UpstreamRoute, call: UpstreamCall, slot: Any = None) -> HttpResponseBase:
    """Charge and record, forward, answer as the provider did (model renamed); a plain
    answer is kept in the response cache's `slot` when the call has one."""
    job = upstreamjobs.open_upstream(request.auth.presented, route, call)
    note_job(request, job)
    return answer_upstream(request, job, route, call, slot)


def answer_upstream(
    request, job: Job, route: UpstreamRoute, call: UpstreamCall, slot: Any = None, *, last: bool = True
) -> HttpResponseBase:
    """Forward `job`'s call to `route`'s provider and answer as it did, with the name
    the client called. Until something reaches the client (a plain answer read whole
    and checked, a stream's first event) a failure is raised as an UpstreamFailure and
    fails the job, unless `last` is False and another backend may do better
    (`moves_on`): the job then stays active for its route's next backend. The
    provider's circuit breaker hears of every outcome."""
    note = log_fields(request)
    try:
        response = upstream.open_response(route, call.kind, call.body_for(route.model.upstream_name))
        if call.stream:
            events = first_event_read(response, provider_events(route, response))
        else:
            data = upstream.read_json(route, response)
            upstream.check_answer(route, job.kind, data)
    except UpstreamFailure as failure:
        heard(route, failure)
        if last or not failure.moves_on:
            fail(job, failure)
        raise
    heard(route)
    headers = response_headers(job, response)
    if call.stream:
        stream = relay_stream(job, route, call, response, events, client_gone_probe(request), note)
        answer = sse_response(stream, job)
    else:
        data["model"] = job.model
        finish(job, route, answer_text(data), upstream.usage_numbers(data), 1, note)
        if slot is not None:
            cache.store(slot, {"body": data, "usage": upstream.usage_numbers(data)})
        answer = JsonResponse(data)
    for name, value in headers.items():
        answer[name] = value
    return answer


def heard(route: UpstreamRoute, failure: UpstreamFailure | None = None) -> None:
    """What a call taught of its provider: an answer (a refusal of the request itself is
    one) closes its breaker; its own failure counts towards opening it, with the
    Retry-After it sent. Every failure is counted in the metrics."""
    policy = breaker.Policy.of(route.upstream)
    if failure is None or not failure.moves_on:
        breaker.board().succeeded(route.provider, policy)
    if failure is not None:
        metrics.UPSTREAM_ERRORS.labels(route.provider, failure.code).inc()
        if failure.moves_on and failure.provider_fault:
            breaker.board().failed(route.provider, policy, failure.retry_after_s)


def first_event_read(response: providers.ProviderResponse, events: Iterator[dict | None]) -> Iterator[dict | None]:
    """The provider's stream with its first event already read, so a stream that fails
    before it fails before anything reached the client (and a route may go on)."""
    try:
        first = next(events)
    except BaseException:
        response.close()
        raise
    return itertools.chain([first], events)


def provider_events(route: UpstreamRoute, response: providers.ProviderResponse) -> Iterator[dict | None]:
    """The provider's stream as events, None for its `[DONE]`; a stream that ends
    without it, or an event that is not OpenAI's chunk, is an UpstreamFailure."""
    for data in upstream.sse_data(route, response):
        if data == "[DONE]":
            yield None
            return
        yield parse_event(route, data)
    raise UpstreamFailure(502, "upstream_error", f"The stream from the provider {route.provider!r} ended early.")


def response_headers(job: Job, response: providers.ProviderResponse) -> dict[str, str]:
    headers = {"X-Request-Id": str(job.id)}
    request_id = upstream.upstream_request_id(response)
    if request_id:
        headers["X-Upstream-Request-Id"] = request_id
    return headers


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
    route: UpstreamRoute,
    call: UpstreamCall,
    response: providers.ProviderResponse,
    events: Iterator[dict | None],
    client_gone: Callable[[], bool],
    note: dict,
) -> Iterator[bytes]:
    """Each provider event goes out as soon as it arrives, with our model name; the
    usage chunk we asked for is kept for the record and dropped unless the client
    asked too. Whatever stops this early (the client left) closes the provider's
    stream, which cancels its generation, and the job keeps what was streamed. A
    failure from here on is the stream's last event, and the job's end."""
    pieces: list[str] = []
    kept = 0  # characters of text in `pieces`, bounded like a plain answer
    usage: tuple[int, int] | None = None
    ended = False
    try:
        for event in events:
            if client_gone():
                note["outcome"] = "client_gone"
                return
            if event is None:
                ended = True
                finish(job, route, "".join(pieces), usage, len(pieces), note)
                yield SSE_DONE
                return
            usage = upstream.usage_numbers(event) or usage
            text = delta_text(event)
            if text:
                pieces.append(text)
                kept += len(text)
                if kept > route.upstream.max_response_bytes:
                    raise upstream.too_large(route, route.upstream.max_response_bytes)
            if not call.include_usage:
                if event.get("usage") and not event.get("choices"):
                    continue
                event.pop("usage", None)
            event["model"] = job.model
            yield sse_event(event)
    except UpstreamFailure as failure:
        ended = True
        note["outcome"] = failure.code
        heard(route, failure)
        try:
            fail(job, failure)
        except (OperationalError, InterfaceError):
            log.error("job %s could not be marked failed: the database is unavailable", job.id)
        yield error_event(failure.status, failure.code, failure.message)
    except (OperationalError, InterfaceError):
        ended = True  # nothing more can be recorded
        yield database_down_event(job, note)
    finally:
        response.close()
        if not ended:
            with contextlib.suppress(Exception):
                upstreamjobs.abandon_upstream(job, usage, len(pieces))


def parse_event(route: UpstreamRoute, data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        raise UpstreamFailure(
            502, "upstream_error", f"The provider {route.provider!r} sent an unreadable event."
        ) from None
    if not isinstance(event, dict):
        raise upstream.unexpected(route, "event")
    if event.get("error"):
        raise upstream.provider_error(route, event)
    # A chunk has choices (empty in the usage chunk); anything else is not OpenAI's shape.
    if not isinstance(event.get("choices"), list) and not isinstance(event.get("usage"), dict):
        raise upstream.unexpected(route, "event")
    return event


def finish(job: Job, route: UpstreamRoute, text: str, usage: tuple[int, int] | None, pieces: int, note: dict) -> None:
    """Record the answer, and what it was charged in the request's log line."""
    prompt, completion = upstreamjobs.finish_upstream(job, route, text, usage, pieces)
    note.update(prompt_tokens=prompt, completion_tokens=completion)


def fail(job: Job, failure: UpstreamFailure) -> None:
    upstreamjobs.fail_upstream(job, failure.status, failure.code, failure.message)
