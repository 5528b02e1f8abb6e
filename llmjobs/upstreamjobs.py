"""An upstream call's job: opened running in the web process that forwards it (its
`worker` names that process by its journal), and its ending: what a provider's answer
is charged (its usage, else an estimate, at its model's price), which of its refusals
are refunded, and its record, written behind the answer (`[server] write_behind`): a
line in this process's journal (`llmjobs.journal`) before the answer goes out, then
`write_finishes` in the journal writer's batches. A web process that dies mid-call
(killed, out of memory) leaves its jobs `running`: once its journal is recovered,
`end_orphans` fails them, refunded. The statements that end a job are the
lifecycle's (`llmjobs.lifecycle`), as for every job; this is the part of its billing
policy only upstream calls have.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Collection
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection
from django.utils import timezone

from apikeys.keys import PresentedKey
from djangollmapi.routes import UpstreamRoute
from llmjobs import journal, oneround
from llmjobs.admission import JobRequest, admit_job
from llmjobs.lifecycle import (
    EndedJob,
    Success,
    cancel,
    count_ending,
    fail,
    finish,
    finish_all_in_transaction,
    finish_in_transaction,
    record_cancelled,
    release_db_connection,
    settle_rate_limits,
    success,
)
from llmjobs.models import Job

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # the estimate, when a provider reports no usage
GATEWAY_LOST = "gateway_lost"
GATEWAY_LOST_MESSAGE = (
    "The web process forwarding this call to its provider stopped (killed, out of memory, or past its "
    "graceful stop's grace) before the answer was recorded; the call was not charged."
)
HOST = socket.gethostname()
RUNNER_PREFIX = "web@"


def open_upstream(presented: PresentedKey, route: UpstreamRoute, request: JobRequest) -> Job:
    """Take the call exactly as for a local model and record a job that runs at once,
    in this web process (the provider is the device; the job's `worker` is `runner()`);
    the database connection goes back to the pool for the provider's answer."""
    job, _weight = admit_job(
        presented,
        route.name,
        request,
        price=route.model,
        backend=route.provider,
        status=Job.Status.RUNNING,
        worker=runner(),
    )
    release_db_connection()
    return job


def process_journal() -> journal.Journal:
    """This process's journal: its upstream calls' records (write-behind) and the proof
    that it lives, whose name its running jobs carry. OSError when it cannot be made."""
    return journal.journal(write_finishes, end_orphans, runs_calls)


def runner() -> str:
    """The `worker` of the upstream jobs this process runs ("" without a journal: then
    its calls work, and a death mid-call leaves them `running`, as it would anyway)."""
    try:
        return runner_name(process_journal().name)
    except OSError as exc:
        if not said_no_journal:
            log.error("no journal in %s (%s): a death mid-call leaves its jobs running", journal.journal_dir(), exc)
            said_no_journal.append(str(exc))
        return ""


said_no_journal: list[str] = []  # once per process


def runner_name(journal_name: str) -> str:
    """Its host (for an operator) and its journal's name, unique to its life: what a
    recovery finds its jobs by, whatever the recovering host's name."""
    return f"{RUNNER_PREFIX}{HOST}/{journal_name}"


def jobs_running_in(journal_name: str):
    """The upstream jobs still running in the process of this journal. The (queue,
    status) index finds them: an upstream job has no queue."""
    running = Job.objects.filter(queue="", status=Job.Status.RUNNING, worker__startswith=RUNNER_PREFIX)
    return running.filter(worker__endswith=f"/{journal_name}")


def runs_calls(journal_name: str) -> bool:
    """Whether this journal's process has upstream calls running (as it leaves)."""
    try:
        return jobs_running_in(journal_name).exists()
    finally:
        release_db_connection()


def end_orphans(journal_name: str, answered: Collection[str] = ()) -> int:
    """Fail, refunded, the upstream jobs the dead process of this journal was still
    running: nobody is left to finish them. Its journal's lines are written by then;
    a job one of them answered (`answered`) is never refunded, even if its line could
    not be written. How many it ended. A job that cannot be ended for anything but
    the database being away is logged and left, so that it holds up no other."""
    close_old_connections()  # the writer's thread keeps its connection between batches
    ended = 0
    try:
        for job_id in jobs_running_in(journal_name).values_list("id", flat=True):
            if str(job_id) in answered:
                continue
            try:
                ended += fail(job_id, GATEWAY_LOST, GATEWAY_LOST_MESSAGE, only_status=Job.Status.RUNNING)
            except (OperationalError, InterfaceError):
                raise  # the database is away: the journal is kept and recovered again
            except Exception:
                log.exception("upstream job %s of a dead web process could not be ended", job_id)
    finally:
        release_db_connection()
    if ended:
        log.warning("failed %d upstream jobs, refunded: their web process (%s) died mid-call", ended, journal_name)
    return ended


# A provider's refusals that are about our side (its secret, its limits there), not
# the client's request: refunded like any server-side failure.
PROVIDER_SIDE_4XX = {401, 403, 408, 409, 429}


def finish_upstream(
    job: Job, route: UpstreamRoute, text: str, usage: tuple[int, int] | None, pieces: int = 1
) -> tuple[int, int]:
    """Record a provider's answer and charge its usage and price; a provider that
    reported no usage is charged `estimated_usage`. The (prompt, completion) charged."""
    prompt, completion = usage or estimated_usage(job, pieces)
    cost = route.model.cost(prompt, completion)
    store_output = job.kind != Job.Kind.EMBEDDINGS
    if settings.LLM_CONFIG.server.write_behind:
        finish_later(job, text, prompt, completion, store_output=store_output, cost_usd=cost)
    else:
        finish(job.id, text, prompt, completion, store_output=store_output, cost_usd=cost)
    return prompt, completion


def finish_later(
    job: Job, text: str, prompt_tokens: int, completion_tokens: int, *, store_output: bool, cost_usd: float | None
) -> None:
    """`finish`, write-behind (`llmjobs.journal`): the record goes to this process's
    journal before the answer goes out, and into the database with the next batch;
    the rate limits and metrics are settled now."""
    entry = journal_entry(job, text, prompt_tokens, completion_tokens, store_output, cost_usd)
    try:
        recorded = process_journal().record(entry)
    except OSError:  # no journal can be made: the record is written now
        recorded = False
    if not recorded:
        finish(job.id, text, prompt_tokens, completion_tokens, store_output=store_output, cost_usd=cost_usd)
        return
    ended = EndedJob(*(getattr(job, name) for name in EndedJob._fields))
    settle_rate_limits(job.id, ended, prompt_tokens + completion_tokens, release=True)
    count_ending(job.model, Job.Status.SUCCEEDED, "", prompt_tokens, completion_tokens)


def journal_entry(
    job: Job, text: str, prompt_tokens: int, completion_tokens: int, store_output: bool, cost_usd: float | None
) -> dict[str, Any]:
    """A success as its journal line: no answer on disk that the row would not keep."""
    stored = store_output and settings.LLM_CONFIG.server.store_payloads
    return {
        "id": str(job.id),
        "key": job.api_key_id,
        "output": text if stored else "",
        "output_chars": len(text),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "store_output": stored,
        "cost_usd": cost_usd,
        "finished_at": timezone.now().isoformat(),
    }


def write_finishes(entries: list[dict[str, Any]]) -> None:
    """The journal's batch, key by key (so that two writers take the keys' rows in one
    order): on PostgreSQL in one round trip (`oneround.finish_many`), elsewhere in one
    transaction (one commit, one SQLite write lock); a job that ended meanwhile is
    left as it is. Should the batch fail for anything but the database being away, each
    entry is tried alone, and one that cannot be written is logged with what it charged
    and dropped, so that it holds up no other."""
    entries = sorted(entries, key=lambda entry: (entry.get("key") or 0, entry["id"]))
    close_old_connections()  # the writer's thread keeps its connection between batches
    try:
        write_batch([success_of(entry) for entry in entries])
    except (OperationalError, InterfaceError):
        raise  # the database is away: the journal keeps the batch and tries again
    except Exception:
        log.exception("a batch of %d finished jobs failed; writing them one by one", len(entries))
        for entry in entries:
            try:
                write_batch([success_of(entry)])
            except (OperationalError, InterfaceError):
                raise
            except Exception:
                charged = {name: entry.get(name) for name in ("prompt_tokens", "completion_tokens", "cost_usd")}
                log.exception("finished job %s could not be recorded (%s); dropped", entry.get("id"), charged)
    finally:
        release_db_connection()  # a PostgreSQL one goes back to its pool between batches


def write_batch(successes: list[Success]) -> None:
    if oneround.available():
        found = oneround.finish_many([(done.params, done.used, done.counts) for done in successes], durable=True)
        for done, row in zip(successes, found, strict=True):
            if row is None:
                finish_in_transaction(done, durable=True)  # budgeted (or ended: then it does nothing)
        return
    if len(successes) == 1 or connection.vendor == "postgresql":
        for done in successes:  # each its own transaction: no key's row held across round trips
            finish_in_transaction(done, durable=True)
        return
    finish_all_in_transaction(successes, durable=True)  # SQLite: one write lock, one commit


def success_of(entry: dict[str, Any]) -> Success:
    """A journal line's success."""
    return success(
        entry["id"],
        entry["output"],
        entry["prompt_tokens"],
        entry["completion_tokens"],
        store_output=entry["store_output"],
        cost_usd=entry["cost_usd"],
        finished_at=datetime.fromisoformat(entry["finished_at"]),
        output_chars=entry.get("output_chars"),
    )


def fail_upstream(job: Job, status: int, code: str, message: str) -> None:
    """A provider call that failed; refunded unless the provider refused the client's
    own request (a 4xx that is not about our secret or our limits there)."""
    client_fault = 400 <= status < 500 and status not in PROVIDER_SIDE_4XX
    fail(job.id, code, message, refund=not client_fault)


def abandon_upstream(job: Job, usage: tuple[int, int] | None, pieces: int) -> None:
    """The client went away mid-stream: the job ends `cancelled`, charged for what was
    streamed (the provider bills it too); the call is not refunded."""
    cancel(job.id)
    record_cancelled(str(job.id), *(usage or estimated_usage(job, pieces)))


def estimated_usage(job: Job, completion_pieces: int) -> tuple[int, int]:
    """What a provider that reports no usage (or a stream cut before its usage chunk)
    is charged: ~4 characters a prompt token, one token per streamed piece."""
    return -(-job.input_chars // CHARS_PER_TOKEN), completion_pieces
