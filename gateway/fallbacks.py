"""A call to a route (`[[routes]]`): its backends tried in turn, one job for them all.

The call is admitted once, for the most any backend may use, and recorded as one
Job; each backend tried updates its `backend` and `tries`. An upstream backend whose
circuit breaker is open (or whose Retry-After runs) is skipped without a try; one
that fails before anything reached the client (unreachable, too slow, 5xx, 429,
garbage, a stream before its first event) hands the job to the next; a local one
that refuses it (no worker, its model failed to load, its queue full, the broker
down) does too. Once an answer has started, or a local job has been queued, the
call stays where it is: a stream that breaks later ends with its SSE error event.
When none is left the job fails with the last failure (refunded as that failure
is), or 503 `no_backend_available` when every backend was skipped.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any

from django.http import HttpResponseBase

from djangollmapi import metrics
from djangollmapi.errors import ApiError
from djangollmapi.middleware import log_fields, note_job
from djangollmapi.routes import Backend, FallbackRoute, LocalRoute, UpstreamRoute
from gateway import breaker, proxy
from gateway.protocol import forwarded, requests
from gateway.upstream import UpstreamFailure
from llmjobs import lifecycle, sending, upstreamjobs
from llmjobs.models import Job

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutedCall:
    """A route's call, read for each of its backends that can take it (a local model
    refuses what a provider may accept, such as image parts); what admission takes
    is the most any of them may use."""

    kind: Job.Kind
    calls: dict[str, Any]  # backend name -> its call
    input_text: str
    reserve_tokens: int
    stream: bool

    def payload(self) -> Any:
        return None  # each backend gets its own call's


def parse_routed(kind: Job.Kind, data: Any, route: FallbackRoute, max_input_chars: int) -> RoutedCall:
    """The body read for every backend of the route; the first backend's error when
    none can take it."""
    calls: dict[str, Any] = {}
    errors: list[ApiError] = []
    for target in route.targets:
        backend = target.backend
        try:
            if isinstance(backend, UpstreamRoute):
                reserve = backend.upstream.reserve_tokens
                calls[backend.name] = forwarded.parse_upstream(kind, data, reserve, max_input_chars)
            else:
                calls[backend.name] = requests.parse_local(kind, data, backend, max_input_chars)
        except ApiError as error:
            errors.append(error)
    if not calls:
        raise errors[0]
    parsed = list(calls.values())
    return RoutedCall(
        kind,
        calls,
        max((c.input_text for c in parsed), key=len),
        max(c.reserve_tokens for c in parsed),
        parsed[0].stream,
    )


@dataclass(frozen=True)
class LocalTaken:
    """A local backend queued the job: the view follows it like any local job."""

    route: LocalRoute
    call: Any
    job: Job


def serve(
    request, route: FallbackRoute, routed: RoutedCall, rng: random.Random | None = None
) -> HttpResponseBase | LocalTaken:
    """Try the route's backends in its order until one answers (an upstream one) or
    takes the job (a local one)."""
    plan = [backend for backend in route.plan(rng) if backend.name in routed.calls]
    runner = upstreamjobs.runner()  # this process, for its upstream tries
    job = sending.open_routed(request.auth.presented, route, routed, plan[0], runner)
    note_job(request, job)
    tries, last_failure, skipped = 0, None, []
    for backend in plan:
        decision = admission(backend)
        if not decision.go:
            skipped.append(decision)
            metrics.BACKEND_SKIPS.labels(route.name, backend_label(backend), decision.reason).inc()
            continue
        tries += 1
        if not (tries == 1 and backend is plan[0]) and not sending.next_try(job, backend, tries, runner):
            raise ApiError(503, "job_ended", "The call ended while it was being handed on.")
        note_try(request, job)
        call = routed.calls[backend.name]
        try:
            if isinstance(backend, LocalRoute):
                sending.enqueue(job, backend, call.payload(), weight=job.key_weight, fail_refused=False)
                return LocalTaken(backend, call, job)
            return proxy.answer_upstream(request, job, backend, call, last=False)
        except UpstreamFailure as failure:
            if not failure.moves_on:
                raise  # the provider refused the request itself: so would the next
            last_failure = failure
        except ApiError as refusal:  # the local backend could not take it
            last_failure = refusal
        log.warning("route %s: %s failed (%s); trying the next backend", route.name, backend.name, last_failure.code)
        metrics.FALLBACKS.labels(route.name, backend_label(backend), last_failure.code).inc()
    raise ended_without_answer(job, route, plan, last_failure, skipped, runner)


def admission(backend: Backend) -> breaker.Decision:
    """An upstream backend asks its provider's breaker; a local one is always tried
    (its queue and worker are looked at when the job is sent to it)."""
    if isinstance(backend, UpstreamRoute):
        return breaker.board().admit(backend.provider, breaker.Policy.of(backend.upstream))
    return breaker.GO


def backend_label(backend: Backend) -> str:
    """A backend in metrics and logs: the provider, or `local:<deployment>`."""
    return backend.provider if isinstance(backend, UpstreamRoute) else f"local:{backend.name}"


def note_try(request, job: Job) -> None:
    note_job(request, job)
    log_fields(request)["tries"] = job.tries


def ended_without_answer(
    job: Job,
    route: FallbackRoute,
    plan: list[Backend],
    failure: ApiError | None,
    skipped: list[breaker.Decision],
    runner: str = "",
) -> ApiError:
    """No backend answered: the job fails with the last backend's failure (billed as
    that failure is), or, when every one was skipped, with 503 `no_backend_available`
    and a Retry-After for the first that may be tried again."""
    if failure is None:
        wait = max(1, math.ceil(min(d.wait_s for d in skipped)))
        failure = ApiError(
            503,
            "no_backend_available",
            f"Every backend of the model {route.name!r} is cooling down after failures; retry in about {wait} s.",
            headers={"Retry-After": str(wait)},
        )
        sending.next_try(job, plan[0], 0, runner)
    if isinstance(failure, UpstreamFailure):
        proxy.fail(job, failure)
    else:
        lifecycle.fail(job.id, failure.code, failure.message)
    return failure
