"""Admission: every check a call passes before it runs, and the Job row that records
it (`admit_job`, for `llmjobs.lifecycle`): in one transaction, the key, its window,
quota and token budget (one UPDATE), its model list, its period budgets, its rate
limits, then the raw INSERT; on PostgreSQL, for a key with nothing more than its quota,
window, token budget and model list to check, all in one statement
(`llmjobs.oneround`). A refusal anywhere rolls the whole admission back, so a refused
call costs nothing and leaves no row. What a call reserves is decided here:
its `max_tokens` and its prompt's bound, and that many tokens at the model's price.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from apikeys import budgets, ratelimits
from apikeys.keys import PresentedKey
from apikeys.services import take_call
from llmjobs import oneround, rows
from llmjobs.models import Job

# What a chat template may add around a prompt's text: role markers, the generation
# prompt, a default system prompt (SmolLM2's is ~20 tokens). Part of every reservation.
TEMPLATE_TOKENS = 64


class JobRequest(Protocol):
    """A checked request, as the views hand it over."""

    kind: str
    input_text: str  # what the row keeps (if payloads are stored) and counts
    reserve_tokens: int  # taken from the key's token budget with the call

    def payload(self) -> Any: ...


@dataclass(frozen=True)
class Admitted:
    """A call let in: the key's call, its job's id, what it reserved, and whether its
    ending must settle rate limits (Redis) and period budgets."""

    call: Any
    job_id: uuid.UUID
    at: datetime  # the job's created_at: the moment its budgets' periods are counted in
    tokens: int
    spend: Decimal
    budgeted: bool
    rate: ratelimits.Admission


def admit_job(
    presented: PresentedKey, model: str, request: JobRequest, price: Any = None, **fields: Any
) -> tuple[Job, int]:
    """Let the call in and write its Job row (`fields`: its queue, backend, status): in
    one statement where `llmjobs.oneround` can take it (a key with nothing more to
    check), else in one transaction through every check (`admit`). The job, carrying
    its rate-limit headers, and its key's weight (its share of a busy device)."""
    tried = oneround.may_admit(presented)
    if tried:
        job = build_job(
            None,
            model,
            request,
            created_at=budgets.now(),
            tokens_reserved=reservation(request),
            spend_reserved=reserved_spend(price, request),
            **fields,
        )
        call = oneround.admit(presented, model, job)
        if call is not None:
            job.rate_headers = {}
            return job, call.weight
    with transaction.atomic():
        admitted = admit(presented, model, request, price)
        job = create_admitted_job(admitted, model, request, **fields)
    if tried:  # not again while it is remembered: after a while, it is tried again
        oneround.needed_full_path(presented)
    return job, admitted.call.weight


def admit(presented: PresentedKey, model: str, request: JobRequest, price: Any = None) -> Admitted:
    """Every check a call passes before it runs, inside the transaction that records
    its job, so any refusal rolls the whole admission back: the key, its window, quota
    and token budget (one UPDATE), its period budgets, then its rate limits. It
    reserves the most it can use: its `max_tokens` and its prompt's bound, and that
    many tokens at `price` (an upstream model's; None: free)."""
    tokens = reservation(request)
    call = take_call(presented, model, tokens)
    spend = reserved_spend(price, request)
    at = budgets.now()
    budgeted = budgets.take(call, tokens, spend, at)
    job_id = uuid.uuid4()
    rate = ratelimits.admit(call, model, str(job_id), tokens)
    return Admitted(call, job_id, at, tokens, spend, budgeted, rate)


def reserved_spend(price: Any, request: JobRequest) -> Decimal:
    """The most a call can cost at `price`: its prompt's bound in, its `max_tokens` out."""
    if price is None:
        return Decimal(0)
    cost = price.cost(prompt_bound(request.input_text), request.reserve_tokens)
    return Decimal(0) if cost is None else Decimal(str(round(cost, 8)))


def reservation(request: JobRequest) -> int:
    """The tokens a call may use at most, reserved before it runs and settled to what
    it used: its `max_tokens` (if it generates) and its prompt, bounded from its length
    so the budget holds whatever the prompt's size. Counting tokens uses none."""
    if request.kind == Job.Kind.TOKENIZE:
        return request.reserve_tokens
    return request.reserve_tokens + prompt_bound(request.input_text)


def prompt_bound(text: str) -> int:
    """At most one token per UTF-8 byte of the text (a byte-level BPE token, as GPT-2,
    Llama 3, SmolLM2 and OpenAI's tiktoken make them, covers at least one byte), plus
    what a chat template adds around it."""
    return len(text.encode("utf-8", "surrogatepass")) + TEMPLATE_TOKENS


def create_admitted_job(admitted: Admitted, model: str, request: JobRequest, **fields: Any) -> Job:
    """`create_job` for an admitted call, carrying its rate-limit headers; should the
    row not be written, the call's place in its rate limits is given back (its budgets
    roll back with the transaction)."""
    admission = {
        "job_id": admitted.job_id,
        "created_at": admitted.at,
        "tokens_reserved": admitted.tokens,
        "rate_limited": admitted.rate.limited,
        "budgeted": admitted.budgeted,
        "spend_reserved": admitted.spend,
    }
    try:
        job = create_job(admitted.call.key_id, model, request, **admission, **fields)
    except BaseException:
        if admitted.rate.limited:
            ratelimits.settle(admitted.call.key_id, model, str(admitted.job_id), -admitted.tokens, release=True)
        raise
    job.rate_headers = admitted.rate.headers
    return job


def create_job(key_id: int, model: str, request: JobRequest, **fields: Any) -> Job:
    """Record the call before it is queued or sent, so even a lost job leaves a row:
    one raw INSERT (`llmjobs.rows`) of the row the model builds with its defaults."""
    job = build_job(key_id, model, request, **fields)
    with connection.cursor() as cursor:
        cursor.execute(rows.INSERT_SQL, rows.params(rows.job_columns(job)))
    job._state.adding, job._state.db = False, connection.alias
    return job


def build_job(
    key_id: int | None,
    model: str,
    request: JobRequest,
    *,
    queue: str = "",
    backend: str = "local",
    status: str = Job.Status.QUEUED,
    worker: str = "",
    job_id: uuid.UUID | None = None,
    rate_limited: bool = False,
    budgeted: bool = False,
    spend_reserved: Decimal = Decimal(0),
    created_at: datetime | None = None,
    tokens_reserved: int | None = None,
) -> Job:
    """The Job row of a call, unsaved."""
    now, text = created_at or timezone.now(), request.input_text
    return Job(
        id=job_id or uuid.uuid4(),
        rate_limited=rate_limited,
        budgeted=budgeted,
        spend_reserved=spend_reserved,
        api_key_id=key_id,
        model=model,
        backend=backend,
        queue=queue,
        worker=worker,
        kind=request.kind,
        status=status,
        input_text=text if settings.LLM_CONFIG.server.store_payloads else "",
        input_chars=len(text),
        tokens_reserved=reservation(request) if tokens_reserved is None else tokens_reserved,
        created_at=now,
        started_at=now if status == Job.Status.RUNNING else None,
    )
