"""A job's lifecycle and its key's charge, in one place: with `llmjobs.sending` (a job
created and sent: its admission, which `llmjobs.admission` takes and records, its
queue, a route's next backend), the only code that starts, finishes, fails, cancels,
refunds and settles a job, local or upstream alike, and the only caller of
`apikeys.services.refund_call` and `settle_tokens`.

The billing policy, here but for the part only upstream calls have (which of a
provider's refusals are refunded, what an answer without usage costs, the record
written behind the answer: `llmjobs.upstreamjobs`, which ends jobs through this):

- A call is taken (its `max_tokens` reserved) in the transaction that records its
  job: a refused call leaves neither a charge nor a row. A route's call is taken once,
  for the most any of its backends may use, however many it tries.
- A server-side failure is refunded exactly once (the claim on `Job.refunded`); a
  cancellation and the client's own fault (a provider's 400 / 404 / 422) are not.
- Every job's reservation is replaced exactly once (the claim on
  `Job.tokens_settled`) by what it used: nothing for a failure, what it made for a
  cancellation, the provider's usage (else an estimate) for an upstream call, which
  also costs its configured price.

Every final write is conditional on the job still being active, so whoever ends a
job first (the worker, a time limit, the waiting request) wins and nothing is
finished twice. Following a job's events is `llmjobs.follow`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

import redis
from django.conf import settings
from django.db import (
    DEFAULT_DB_ALIAS,
    close_old_connections,
    connection,
    connections,
    transaction,
)
from django.utils import timezone

from apikeys import budgets, ratelimits
from apikeys.keys import PresentedKey
from apikeys.services import refund_call, settle_statement, settle_tokens
from djangollmapi import metrics
from djangollmapi.wire import storable_copy
from llmjobs import events, oneround, rollups, rows
from llmjobs.admission import JobRequest, admit_job
from llmjobs.models import Job

log = logging.getLogger(__name__)

CANCELLED_MESSAGE = "The job was cancelled: its client went away."


@dataclass(frozen=True)
class Outcome:
    """What a job that ran hands on: `result` to its follower (the `done` event),
    `stored` to the row, and the token counts its key is charged."""

    result: Any
    stored: Any
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cancelled: bool = False
    store_output: bool = True
    device: DeviceUse | None = None


@dataclass(frozen=True)
class DeviceUse:
    """What a local job took of its device: seconds (its share of each step it was
    in), the most jobs it shared a step with, and when the device was done with it
    (its row's `finished_at`, however late the row is written)."""

    seconds: float
    batch_size: int
    ended_at: datetime

    def columns(self) -> dict[str, Any]:
        return {"device_s": round(self.seconds, 6), "batch_size": self.batch_size, "finished_at": self.ended_at}


def ending_columns(device: DeviceUse | None) -> dict[str, Any]:
    """An ended job's `finished_at` (when its device was done with it, else now) and,
    for a local job, what it took of its device."""
    return device.columns() if device else {"finished_at": timezone.now()}


def release_db_connection() -> None:
    """Hand the connection back to the pool before a long wait, so hundreds of waiting
    threads do not hold hundreds of PostgreSQL connections (never inside a transaction)."""
    default = connections[DEFAULT_DB_ALIAS]
    if default.in_atomic_block:
        return
    if default.vendor == "postgresql":
        default.close()
    else:
        close_old_connections()


# --- run by the worker --------------------------------------------------------


def start(job_id: str, worker: str) -> bool:
    """The worker claims a queued job; False when it was cancelled or ended meanwhile.
    One raw UPDATE (the ORM's costs 0.2 ms more CPU here); on PostgreSQL with the
    transaction's `synchronous_commit` off, as the finish (`claim_finish`): a
    database crash may lose the claim, never a charge."""
    values = [("status", Job.Status.RUNNING), ("started_at", timezone.now()), ("worker", worker), ("id", job_id)]
    params = [*rows.params(values), Job.Status.QUEUED]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(rows.ASYNC_COMMIT + rows.START_SQL, params)
            cursor.nextset()
        else:
            cursor.execute(rows.START_SQL, params)
        return cursor.rowcount == 1


def complete(job_id: str, outcome: Outcome) -> None:
    """Record what a job produced, then tell its follower. Recording first means a
    client that has its answer finds the row and charge already done. A job whose
    client left just after its last token (cancelled between that token and this
    write) keeps the tokens it made and is charged exactly them."""
    prompt, completion, device = outcome.prompt_tokens, outcome.completion_tokens, outcome.device
    if outcome.cancelled:
        record_cancelled(job_id, prompt or 0, completion or 0, device=device)
        events.emit(job_id, "error", code="cancelled", message=CANCELLED_MESSAGE)
        return
    json.dumps(outcome.result)  # it travels and is stored as JSON: refuse anything else here
    if not finish(job_id, outcome.stored, prompt, completion, store_output=outcome.store_output, device=device):
        record_cancelled(job_id, prompt or 0, completion or 0, device=device)
    events.emit(job_id, "done", output=outcome.result)


def fail_in_worker(
    job_id: str, code: str, message: str, *, only_status: str | None = None, device: DeviceUse | None = None
) -> bool:
    """Fail (and refund) a job the worker could not finish, and tell its follower;
    nothing when it had ended already, e.g. its waiting request timed it out first."""
    failed = fail(job_id, code, message, only_status=only_status, device=device)
    if failed:
        events.emit(job_id, "error", code=code, message=message)
    return failed


# --- ended ----------------------------------------------------------------------


def finish(
    job_id: Any,
    output: Any,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    *,
    store_output: bool = True,
    cost_usd: float | None = None,
    device: DeviceUse | None = None,
) -> bool:
    """Record success, settle the key's tokens and count the job's day (`record_success`),
    then its rate limits and metrics; False when the job had ended already."""
    done = success(job_id, output, prompt_tokens, completion_tokens, store_output, cost_usd, device)
    job = record_success(done)
    if job is None:
        return False
    settle_rate_limits(job_id, job, done.used, release=True)
    count_ending(job.model, Job.Status.SUCCEEDED, "", prompt_tokens, completion_tokens)
    return True


def record_success(done: Success) -> EndedJob | None:
    """A success in the database (every call pays this): the job's conditional
    UPDATE ... RETURNING, the key's increment and the rollup's UPSERT, in one statement
    on PostgreSQL (`llmjobs.oneround`) for a job without period budgets, else in one
    transaction that settles those too. An active job has never been settled (every
    settling path also ends the job), so marking it settled here is the once-only
    claim: the ended job, or None."""
    row = oneround.finish(done.params, done.used, done.counts) if oneround.available() else None
    return EndedJob(*row) if row is not None else finish_in_transaction(done)


class Success(NamedTuple):
    """A success's columns, as the finish's statements take them."""

    params: list[Any]  # FINISH_SQL's
    used: int
    values: dict[str, Any]

    @property
    def counts(self) -> rollups.Counts:
        """What it adds to its day, but its input (the row's, read by the statement)."""
        return success_counts(self.values, 0)


def success(
    job_id: Any,
    output: Any,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    store_output: bool = True,
    cost_usd: float | None = None,
    device: DeviceUse | None = None,
    finished_at: datetime | None = None,
    output_chars: int | None = None,
) -> Success:
    """A success's columns; `store_output` False keeps bulky outputs (embedding
    vectors) out of the table."""
    store = settings.LLM_CONFIG.server.store_payloads and store_output
    values = {
        "status": Job.Status.SUCCEEDED,
        "finished_at": finished_at or (device.ended_at if device else timezone.now()),
        "output": storable_copy(output) if store else None,
        "output_chars": output_chars
        if output_chars is not None
        else len(output if isinstance(output, str) else str(output)),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": None if cost_usd is None else Decimal(str(round(cost_usd, 8))),
        "tokens_settled": True,
        "device_s": round(device.seconds, 6) if device else None,
        "batch_size": device.batch_size if device else None,
    }
    params = [*rows.params([*values.items(), ("id", job_id)]), Job.Status.QUEUED, Job.Status.RUNNING]
    return Success(params, (prompt_tokens or 0) + (completion_tokens or 0), values)


def success_counts(values: dict[str, Any], input_chars: int) -> rollups.Counts:
    """What a success with `finish`'s column `values` adds to its day."""
    return rollups.ended(
        Job.Status.SUCCEEDED,
        input_chars=input_chars,
        output_chars=values["output_chars"],
        prompt_tokens=values["prompt_tokens"] or 0,
        completion_tokens=values["completion_tokens"] or 0,
        cost_usd=values["cost_usd"] or Decimal(0),
        device_s=values["device_s"] or 0.0,
    )


def finish_in_transaction(done: Success, durable: bool = False) -> EndedJob | None:
    """`finish`'s claim, the key's settlement, the job's period budgets (when it has
    them) and its day's rollup, in one transaction; the ended job, or None when it was
    not active. `durable`: its commit waits for the disk (`claim_finish`)."""
    params, used, values = done
    with transaction.atomic(), connection.cursor() as cursor:
        row = claim_finish(cursor, params, durable)
        if row is None:
            return None
        job = EndedJob(*row)
        counts = success_counts(values, job.input_chars)
        settle = None if job.api_key_id is None else settle_statement(job.api_key_id, used - job.tokens_reserved)
        rollup = rollups.add_statement(job.api_key_id, job.model, job.created_at, counts)
        if job.budgeted:  # rows in the key's order of locks: key, budget periods, rollup
            run_together(cursor, [settle])
            settle_budgets(job, used=used, spend=values["cost_usd"], device_s=values["device_s"])
            run_together(cursor, [rollup])
        else:
            run_together(cursor, [settle, rollup])
    return job


def finish_all_in_transaction(successes: list[Success], durable: bool = False) -> list[EndedJob | None]:
    """`finish_in_transaction` for a batch (a journal's, on SQLite), in one transaction:
    each job's claim, then, for those without period budgets, one settlement per key
    and one rollup per key, model and day, summed over the batch. n answers of one key
    cost n + 2 statements instead of 5n (each claim's savepoint included); what each
    key and day gains is the same sum. Each job's ended row, or None (not active)."""
    ended: list[EndedJob | None] = []
    settled: dict[int, int] = {}
    days: dict[tuple[int, str, Any], tuple[Any, rollups.Counts]] = {}
    with transaction.atomic(), connection.cursor() as cursor:
        for done in successes:
            row = claim_finish(cursor, done.params, durable)
            job = None if row is None else EndedJob(*row)
            ended.append(job)
            if job is None or job.api_key_id is None:
                continue
            counts = success_counts(done.values, job.input_chars)
            if job.budgeted:  # its periods settle between its key and its rollup, as alone
                run_together(cursor, [settle_statement(job.api_key_id, done.used - job.tokens_reserved)])
                settle_budgets(job, used=done.used, spend=done.values["cost_usd"], device_s=done.values["device_s"])
                run_together(cursor, [rollups.add_statement(job.api_key_id, job.model, job.created_at, counts)])
                continue
            settled[job.api_key_id] = settled.get(job.api_key_id, 0) + done.used - job.tokens_reserved
            day = (job.api_key_id, job.model, rollups.usage_day(job.created_at))
            at, before = days.get(day, (job.created_at, None))
            days[day] = (at, counts if before is None else rollups.summed(before, counts))
        run_together(cursor, [settle_statement(key_id, delta) for key_id, delta in sorted(settled.items())])
        rollup = [rollups.add_statement(key, model, at, counts) for (key, model, _), (at, counts) in days.items()]
        run_together(cursor, rollup)
    return ended


def claim_finish(cursor: Any, params: list[Any], durable: bool = False) -> tuple | None:
    """The once-only claim of a job's success: its conditional UPDATE ... RETURNING, the
    ended row or None. On PostgreSQL it goes in one round trip with the transaction's
    `synchronous_commit` off: bookkeeping, not the quota, so a database crash may lose
    the last instants of finished jobs' records (they stay `running`), and no call
    waits for a disk flush. Not when `durable`: a journal's lines, deleted once
    written, must be on disk first."""
    if connection.vendor != "postgresql" or durable:
        cursor.execute(rows.FINISH_SQL, params)
        return cursor.fetchone()
    cursor.execute(rows.ASYNC_COMMIT + rows.FINISH_SQL, params)
    cursor.nextset()
    return cursor.fetchone()


def run_together(cursor: Any, statements: list[tuple[str, list[Any]] | None]) -> None:
    """The statements that are there, in order: on PostgreSQL in one round trip (the
    driver binds parameters client-side, so one text may hold several), elsewhere one
    by one. Each round trip to PostgreSQL costs ~0.25 ms of latency and CPU on both
    ends here; every call pays this one."""
    present = [statement for statement in statements if statement is not None]
    if connection.vendor == "postgresql" and len(present) > 1:
        cursor.execute(";".join(sql for sql, _ in present), [p for _, params in present for p in params])
        return
    for sql, params in present:
        cursor.execute(sql, params)


def count_ending(
    model: str, status: str, code: str = "", prompt_tokens: int | None = None, completion_tokens: int | None = None
) -> None:
    """The metrics of a job that just ended: by model, status and code, and its tokens."""
    metrics.JOBS.labels(model, status, code).inc()
    if prompt_tokens:
        metrics.TOKENS.labels(model, "prompt").inc(prompt_tokens)
    if completion_tokens:
        metrics.TOKENS.labels(model, "completion").inc(completion_tokens)


def fail(
    job_id: Any,
    code: str,
    message: str,
    *,
    refund: bool = True,
    only_status: str | None = None,
    device: DeviceUse | None = None,
) -> bool:
    """Mark an active job failed and, unless `refund` is False (the client's own
    fault), give its call back, in one transaction: nobody sees a failed job whose
    call is not yet refunded. Its reservation is released either way. `only_status`:
    only while the job is still in that status, the one its caller judged it in."""
    statuses = [only_status] if only_status else Job.ACTIVE
    columns = ending_columns(device)
    with transaction.atomic():
        updated = Job.objects.filter(id=job_id, status__in=statuses).update(
            status=Job.Status.FAILED, error_code=code, error_message=message, **columns
        )
        if not updated:
            return False
        job = ended_job(job_id)
        settle_job_tokens(job_id, 0)
        refunded = refund and refund_job(job_id)
        settle_budgets(job, used=0, spend=None, device_s=columns.get("device_s"), refunded=refunded)
        counts = rollups.ended(
            Job.Status.FAILED, refunded=refunded, input_chars=job.input_chars, device_s=columns.get("device_s", 0.0)
        )
        rollups.add(job.api_key_id, job.model, job.created_at, counts)
    settle_rate_limits(job_id, job, used=0, release=True)
    count_ending(job.model, Job.Status.FAILED, code)
    return True


class EndedJob(NamedTuple):
    """What the rollups, the limits and the metrics need of a job that just ended (in
    FINISH_SQL's RETURNING order)."""

    api_key_id: int | None
    tokens_reserved: int
    model: str
    created_at: datetime | str
    input_chars: int
    rate_limited: bool
    budgeted: bool
    spend_reserved: Any


def ended_job(job_id: Any) -> EndedJob:
    return EndedJob(*Job.objects.filter(id=job_id).values_list(*EndedJob._fields).get())


def settle_budgets(
    job: EndedJob, *, used: int | None, spend: Any, device_s: float | None, refunded: bool = False
) -> None:
    """Replace what a budgeted job reserved in its periods by what it used (`used`
    None: its tokens are not counted yet), inside its ending's transaction."""
    if not job.budgeted or job.api_key_id is None:
        return
    reserved_spend = Decimal(str(job.spend_reserved or 0))
    budgets.settle(
        job.api_key_id,
        rollups.as_datetime(job.created_at),
        calls=-1 if refunded else 0,
        tokens=0 if used is None else used - job.tokens_reserved,
        spend=Decimal(0) if used is None else Decimal(str(spend or 0)) - reserved_spend,
        device_s=device_s or 0.0,
    )


def settle_rate_limits(job_id: Any, job: EndedJob, used: int | None, release: bool) -> None:
    """A rate-limited job ended (`release`) or had its tokens counted (`used`; None:
    not yet): correct its key's limits in Redis, once the ending committed."""
    if not job.rate_limited or job.api_key_id is None:
        return
    delta = 0 if used is None else used - job.tokens_reserved
    ratelimits.settle(job.api_key_id, job.model, str(job_id), delta, release)


def time_out(job_id: Any) -> bool:
    """The waiting request gave up: fail and refund the job, and keep the worker from
    starting it if it is still queued. False when the job had ended meanwhile."""
    failed = fail(job_id, "job_timeout", "The job did not finish in time.")
    with contextlib.suppress(redis.RedisError):
        events.request_cancel(str(job_id))
    return failed


def cancel(job_id: Any) -> bool:
    """Stop a job nobody waits for any more (its client went away). A queued one never
    runs (the worker checks the flag before it starts) and its reservation is
    released here; a running one stops at its next token and the worker records and
    charges what it made (`complete`). The call is not refunded: the client chose."""
    events.request_cancel(str(job_id))
    now = timezone.now()
    with transaction.atomic():
        if Job.objects.filter(id=job_id, status=Job.Status.QUEUED).update(status=Job.Status.CANCELLED, finished_at=now):
            settle_job_tokens(job_id, 0)
            used = 0
        elif Job.objects.filter(id=job_id, status=Job.Status.RUNNING).update(
            status=Job.Status.CANCELLED, finished_at=now
        ):
            used = None  # counted when the worker stops it (record_cancelled)
        else:
            return False
        job = ended_job(job_id)
        rollups.add(
            job.api_key_id, job.model, job.created_at, rollups.ended(Job.Status.CANCELLED, input_chars=job.input_chars)
        )
        settle_budgets(job, used=used, spend=None, device_s=None)
    settle_rate_limits(job_id, job, used, release=True)
    return True


def record_cancelled(job_id: Any, prompt_tokens: int, completion_tokens: int, device: DeviceUse | None = None) -> bool:
    """The job stopped because it was cancelled: keep what it produced on the row and
    charge exactly that, once. A job that failed meanwhile stays failed and uncharged.
    A job still `running` ends here; one `cancel` ended already only gets its tokens."""
    columns = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, **ending_columns(device)}
    with transaction.atomic():
        running = Job.objects.filter(id=job_id, status=Job.Status.RUNNING)
        ends_now = bool(running.update(status=Job.Status.CANCELLED, **columns))
        if not ends_now:
            cancelled = Job.objects.filter(id=job_id, status=Job.Status.CANCELLED, tokens_settled=False)
            if not cancelled.update(**columns):
                return False
        job = ended_job(job_id)
        settle_job_tokens(job_id, prompt_tokens + completion_tokens)
        counts = rollups.Counts(
            requests=int(ends_now),
            cancelled=int(ends_now),
            input_chars=job.input_chars if ends_now else 0,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            device_s=columns.get("device_s", 0.0),
        )
        rollups.add(job.api_key_id, job.model, job.created_at, counts)
        settle_budgets(job, used=prompt_tokens + completion_tokens, spend=None, device_s=columns.get("device_s"))
    settle_rate_limits(job_id, job, prompt_tokens + completion_tokens, release=ends_now)
    count_ending(job.model, Job.Status.CANCELLED, "", prompt_tokens, completion_tokens)
    return True


def settle_job_tokens(job_id: Any, used: int) -> bool:
    """Replace the job's token reservation on its key by `used`, exactly once however
    many paths end the job (the claim on `tokens_settled` is the guard)."""
    with transaction.atomic():
        claimed = Job.objects.filter(id=job_id, tokens_settled=False, api_key__isnull=False).update(tokens_settled=True)
        if not claimed:
            return False
        key_id, reserved = Job.objects.filter(id=job_id).values_list("api_key_id", "tokens_reserved").get()
        settle_tokens(key_id, used - reserved)
    return True


def refund_job(job_id: Any) -> bool:
    """Refund the job's call exactly once, however many paths try."""
    with transaction.atomic():
        claimed = Job.objects.filter(id=job_id, refunded=False, api_key__isnull=False).update(refunded=True)
        if not claimed:
            return False
        key_id = Job.objects.filter(id=job_id).values_list("api_key_id", flat=True).get()
        refund_call(key_id)
    return True


# --- cached answers -------------------------------------------------------------


def record_cached(
    presented: PresentedKey,
    model: str,
    request: JobRequest,
    text: str,
    usage: tuple[int, int],
    counted: bool,
    runner: str = "",
) -> Job:
    """A call answered from the response cache: admitted and recorded like any call
    (backend `cache`, run by the web process `runner`), ended at once with the cached
    answer's usage; when hits do not count (`counted` False) it uses nothing and its
    call is given back."""
    job, _weight = admit_job(presented, model, request, backend="cache", status=Job.Status.RUNNING, worker=runner)
    prompt, completion = usage if counted else (0, 0)
    finish(job.id, text, prompt, completion, store_output=request.kind != Job.Kind.EMBEDDINGS)
    if not counted:
        give_back(job.id)
    return job


def give_back(job_id: Any) -> None:
    """Refund an ended job's call (once), in its key's quota, budgets and rollups."""
    with transaction.atomic():
        if refund_job(job_id):
            job = ended_job(job_id)
            rollups.add(job.api_key_id, job.model, job.created_at, rollups.Counts(refunded=1))
            settle_budgets(job, used=None, spend=None, device_s=None, refunded=True)
