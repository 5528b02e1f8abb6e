"""State changes on jobs: create, enqueue, start, finish, fail, refund.

The worker owns a job's lifecycle writes (running → succeeded/failed) because async
jobs have no waiting web request; a waiting request only steps in when it gives up
(timeout). Every final write is conditional on the job still being active, so the
first writer wins and nothing is finished twice.
"""

from __future__ import annotations

import contextlib
import logging
from decimal import Decimal
from typing import Any

import redis
from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerError

from apikeys.keys import PresentedKey
from apikeys.services import consume_call_for_model, refund_call, settle_tokens
from djangollmapi.celery import app as celery_app
from djangollmapi.config import Deployment
from djangollmapi.errors import BROKER_UNAVAILABLE, ApiError
from llmjobs import events
from llmjobs.models import Job
from llmjobs.routing import device_queue_name

log = logging.getLogger(__name__)

RUN_TASK = "llmjobs.run_job"


def submit_job(
    presented: PresentedKey,
    deployment: Deployment,
    kind: str,
    payload: Any,
    *,
    input_text: str,
    reserve_tokens: int = 0,
) -> Job:
    """Take one call (and reserve tokens) from the key, record the job and queue it.
    The call and the usage row commit together; a failed enqueue fails and refunds."""
    with transaction.atomic():
        call = consume_call_for_model(presented, deployment.name, reserve_tokens)
        job = create_job(
            call.key_id, deployment.name, input_text, kind, reserve_tokens, queue=device_queue_name(deployment.device)
        )
    enqueue_job(job, payload)
    return job


def start_upstream_job(
    presented: PresentedKey, model: str, backend: str, kind: str, *, input_text: str, reserve_tokens: int
) -> Job:
    """Take the call and reserve tokens exactly as for a local model, and record a job
    that is running at once: the web process itself forwards it to the provider."""
    with transaction.atomic():
        call = consume_call_for_model(presented, model, reserve_tokens)
        return create_job(
            call.key_id, model, input_text, kind, reserve_tokens, backend=backend, status=Job.Status.RUNNING
        )


def create_job(
    key_id: int,
    model: str,
    text: str,
    kind: str = "run",
    tokens_reserved: int = 0,
    *,
    queue: str = "",
    backend: str = "local",
    status: str = Job.Status.QUEUED,
) -> Job:
    """Record the call before it is queued or sent, so even a lost job leaves a usage row."""
    store = settings.LLM_CONFIG.server.store_payloads
    now = timezone.now()
    return Job.objects.create(
        api_key_id=key_id,
        model=model,
        backend=backend,
        queue=queue,
        kind=kind,
        status=status,
        input_text=text if store else "",
        input_chars=len(text),
        tokens_reserved=tokens_reserved,
        created_at=now,
        started_at=now if status == Job.Status.RUNNING else None,
    )


def enqueue_job(job: Job, payload: Any) -> None:
    """Send the job to its device's queue, or fail fast (503) when no worker serves
    that queue, it is full, or the broker is down: never leave a client hanging."""
    try:
        alive, depth = events.queue_state(job.queue)
        if not alive:
            raise ApiError(503, "no_worker", f"No worker is serving the model {job.model!r}; retry later.")
        if depth >= settings.LLM_CONFIG.server.max_queue_depth:
            raise ApiError(
                503, "queue_full", "The queue for this model is full; retry later.", headers={"Retry-After": "1"}
            )
        soft_limit, hard_limit = job_time_limits(job.model)
        celery_app.send_task(
            RUN_TASK,
            args=(str(job.id), job.model, job.kind, payload),
            task_id=str(job.id),
            queue=job.queue,
            soft_time_limit=soft_limit,
            time_limit=hard_limit,
            retry=False,
        )
    except ApiError as exc:
        fail_job(job.id, exc.code, exc.message)
        raise
    except (BrokerError, events.redis.RedisError, OSError) as exc:
        log.error("enqueue failed for job %s: %s", job.id, type(exc).__name__)
        fail_job(job.id, "broker_unavailable", "The job queue is unavailable.")
        raise ApiError(503, "broker_unavailable", BROKER_UNAVAILABLE) from exc


HARD_LIMIT_GRACE_S = 2.0


def job_time_limits(model: str) -> tuple[float, float]:
    """(soft, hard) seconds a job may run in the worker: its deployment's timeout, as
    nobody waits longer for it, capped by `[worker] time_limit_s`. The soft limit stops
    a job between steps; the hard one kills a job that ignores it."""
    config = settings.LLM_CONFIG
    hard_cap = config.worker.time_limit_s
    soft = min(config.job_timeout_for(config.deployment(model)), hard_cap)
    return soft, min(soft + HARD_LIMIT_GRACE_S, hard_cap)


def release_db_connection() -> None:
    """Hand the connection back to the pool before a long wait, so hundreds of waiting
    threads do not hold hundreds of PostgreSQL connections."""
    if connection.vendor == "postgresql":
        connection.close()
    else:
        close_old_connections()


def mark_running(job_id: str, worker: str) -> bool:
    """Claim a queued job; False when it was cancelled or finished meanwhile."""
    return bool(
        Job.objects.filter(id=job_id, status=Job.Status.QUEUED).update(
            status=Job.Status.RUNNING, started_at=timezone.now(), worker=worker
        )
    )


FINISH_SQL = f"""
UPDATE {Job._meta.db_table}
   SET status = %s, finished_at = %s, output = %s, output_chars = %s,
       prompt_tokens = %s, completion_tokens = %s, cost_usd = %s, tokens_settled = %s
 WHERE id = %s AND status IN (%s, %s)
RETURNING api_key_id, tokens_reserved
"""


def finish_job(
    job_id: str,
    output: Any,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    *,
    store_output: bool = True,
    cost_usd: float | None = None,
) -> bool:
    """Record success and settle the key's tokens, in one transaction of two
    statements (every call pays this, so it is raw SQL like the consume): the job's
    conditional UPDATE ... RETURNING, then the key's increment. An active job has
    never been settled (every settling path also ends the job), so marking it settled
    here is the once-only claim. `store_output` False keeps bulky outputs (embedding
    vectors) out of the table."""
    store = settings.LLM_CONFIG.server.store_payloads and store_output
    values = {
        "status": Job.Status.SUCCEEDED,
        "finished_at": timezone.now(),
        "output": output if store else None,
        "output_chars": len(output) if isinstance(output, str) else len(str(output)),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost_usd": None if cost_usd is None else Decimal(str(round(cost_usd, 8))),
        "tokens_settled": True,
    }
    params = [db_value(name, value) for name, value in values.items()]
    params += [db_value("id", job_id), Job.Status.QUEUED, Job.Status.RUNNING]
    with transaction.atomic(), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # Bookkeeping, not the quota: a crash may lose the last instants of finished
            # jobs' records (they stay `running`), and no call waits for a disk flush.
            cursor.execute("SET LOCAL synchronous_commit TO OFF")
        cursor.execute(FINISH_SQL, params)
        row = cursor.fetchone()
        if row is None:
            return False
        key_id, reserved = row
        if key_id is not None:
            settle_tokens(key_id, (prompt_tokens or 0) + (completion_tokens or 0) - reserved)
    return True


def db_value(field_name: str, value: Any) -> Any:
    """A Python value as the Job column stores it (UUID, JSON, datetime, decimal)."""
    if value is None:
        return None
    field = Job._meta.get_field(field_name)
    if isinstance(value, str) and field_name == "id":
        value = field.to_python(value)
    return field.get_db_prep_save(value, connection)


def fail_job(job_id: str, code: str, message: str, refund: bool = True, only_running: bool = False) -> bool:
    """Mark an active job failed and, for server-side failures, refund its call once,
    in one transaction: nobody sees a failed job whose call is not yet refunded. Its
    token reservation is released either way: a failed job produced nothing usable."""
    statuses = [Job.Status.RUNNING] if only_running else Job.ACTIVE
    with transaction.atomic():
        updated = Job.objects.filter(id=job_id, status__in=statuses).update(
            status=Job.Status.FAILED, finished_at=timezone.now(), error_code=code, error_message=message
        )
        if updated:
            settle_job_tokens(job_id, 0)
            if refund:
                refund_job(job_id)
    return bool(updated)


def cancel_job(job_id: str) -> bool:
    """Stop a job nobody waits for any more (its client went away). A queued one is
    never run (the worker checks the flag before it starts) and its reservation is
    released here; a running one stops at its next token and the worker records and
    settles the tokens it made (`record_cancelled`). The call is not refunded: the
    client chose to stop."""
    events.request_cancel(str(job_id))
    now = timezone.now()
    with transaction.atomic():
        if Job.objects.filter(id=job_id, status=Job.Status.QUEUED).update(status=Job.Status.CANCELLED, finished_at=now):
            settle_job_tokens(job_id, 0)
            return True
    return bool(
        Job.objects.filter(id=job_id, status=Job.Status.RUNNING).update(status=Job.Status.CANCELLED, finished_at=now)
    )


def record_cancelled(job_id: str, prompt_tokens: int, completion_tokens: int) -> bool:
    """Worker side: the job stopped because it was cancelled; keep what it produced on
    the row and charge exactly that. A job that failed meanwhile (its waiting request
    timed out) stays failed and uncharged."""
    with transaction.atomic():
        updated = Job.objects.filter(id=job_id, status__in=[Job.Status.RUNNING, Job.Status.CANCELLED]).update(
            status=Job.Status.CANCELLED,
            finished_at=timezone.now(),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
        if updated:
            settle_job_tokens(job_id, prompt_tokens + completion_tokens)
    return bool(updated)


def settle_job_tokens(job_id, used: int) -> bool:
    """Replace the job's token reservation on its key by `used`, exactly once however
    many paths end the job (the claim on `tokens_settled` is the guard)."""
    with transaction.atomic():
        claimed = Job.objects.filter(id=job_id, tokens_settled=False, api_key__isnull=False).update(tokens_settled=True)
        if not claimed:
            return False
        key_id, reserved = Job.objects.filter(id=job_id).values_list("api_key_id", "tokens_reserved").get()
        settle_tokens(key_id, used - reserved)
    return True


def refund_job(job_id: str) -> bool:
    """Refund the job's call exactly once, however many paths try."""
    with transaction.atomic():
        claimed = Job.objects.filter(id=job_id, refunded=False, api_key__isnull=False).update(refunded=True)
        if not claimed:
            return False
        key_id = Job.objects.filter(id=job_id).values_list("api_key_id", flat=True).get()
        refund_call(key_id)
    return True


def time_out_job(job_id: str) -> bool:
    """The waiting request gave up: fail and refund the job, and keep the worker from
    starting it if it is still queued. False when the job had ended meanwhile."""
    failed = fail_job(job_id, "job_timeout", "The job did not finish in time.")
    with contextlib.suppress(redis.RedisError):
        events.request_cancel(str(job_id))
    return failed


ERROR_STATUS = {
    "job_timeout": 504,
    "broker_unavailable": 503,
    "no_worker": 503,
    "unsupported_operation": 400,
    "cancelled": 409,
}


def wait_for_output(job: Job, timeout_s: float) -> Any:
    """The job's output, or the ApiError that says why there is none. Whoever ends a
    job first wins (the worker, a time limit, this request giving up); when this
    request loses such a race it answers with what was recorded, so a client is never
    charged for an error nor refunded for an answer."""
    try:
        event = events.wait_for_terminal_event(str(job.id), timeout_s)
    except redis.RedisError:
        if fail_job(job.id, "broker_unavailable", "The job queue became unavailable."):
            raise ApiError(503, "broker_unavailable", BROKER_UNAVAILABLE) from None
        return recorded_output(job.id)
    if event is None:
        return give_up_on_job(job, timeout_s)
    if event["event"] == "error":
        raise job_error(event.get("code", "job_failed"), event.get("message", ""), job.id)
    return event["output"]


def give_up_on_job(job: Job, timeout_s: float) -> Any:
    """The wait is over: time the job out (504), unless it ended meanwhile, in which
    case its recorded outcome is the answer."""
    if time_out_job(job.id):
        raise ApiError(504, "job_timeout", f"The model did not answer within {timeout_s:g} s.")
    return recorded_output(job.id)


def recorded_output(job_id) -> Any:
    """What an ended job left: its event if Redis still has it, else its row."""
    with contextlib.suppress(redis.RedisError):
        event = events.terminal_event(str(job_id))
        if event and event["event"] == "done":
            return event["output"]
    job = Job.objects.get(id=job_id)
    if job.status == Job.Status.SUCCEEDED and job.output is not None:
        return job.output
    raise job_error(job.error_code or "job_failed", job.error_message, job_id)


def job_error(code: str, message: str, job_id) -> ApiError:
    if code == "job_time_limit":  # the worker's deadline and ours read the same to a client
        code, message = "job_timeout", "The model did not answer in time."
    param = "model" if code == "unsupported_operation" else None
    return ApiError(ERROR_STATUS.get(code, 500), code, f"{message or 'The job failed.'} (job {job_id})", param=param)
