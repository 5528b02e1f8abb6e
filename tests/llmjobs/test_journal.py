"""Write-behind finishes (`llmjobs.journal`), in-process on the real database: a line
is in the file before anything else happens, the writer writes it and empties the
file, a batch that failed is kept and tried again, a dead process's journal is
written by the next one (and only a dead one's), and writing a line twice changes
nothing; what a dead process was still running is failed, refunded, once its lines
are written. The crash itself, a web process killed between answer and write (or
mid-call), is tests/gateway/test_write_behind.py."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

import pytest
from django.db import OperationalError

from apikeys.keys import parse_key
from apikeys.models import ApiKey, BudgetUse
from llmjobs import admission, journal, lifecycle, oneround, upstreamjobs
from llmjobs.models import Job, UsageDay
from tests.helpers import CheckedChat, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

REQUEST = CheckedChat(reserve_tokens=20, input_text="twelve chars")


def running_job(api_key: ApiKey) -> Job:
    return admission.create_job(api_key.id, "far", REQUEST, backend="prov", status=Job.Status.RUNNING)


def entry(job: Job, prompt: int = 5, completion: int = 7) -> dict:
    return {
        "id": str(job.id),
        "output": "the answer",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "store_output": True,
        "cost_usd": 0.0003,
        "finished_at": "2026-12-02T10:00:00+00:00",
    }


class Recorder:
    """A writer that keeps what it was given, and fails while `failing` is set."""

    def __init__(self) -> None:
        self.batches: list[list[dict]] = []
        self.failing = threading.Event()

    def __call__(self, batch: list[dict]) -> None:
        if self.failing.is_set():
            raise RuntimeError("the database is away")
        self.batches.append(list(batch))


def test_a_line_is_in_the_file_until_it_is_written_then_the_file_is_emptied(tmp_path):
    writer = Recorder()
    writer.failing.set()
    book = journal.Journal(tmp_path, writer)
    try:
        book.record({"id": "one"})
        book.record({"id": "two"})
        lines = [json.loads(line) for line in book.path.read_text().splitlines()]
        assert [line["id"] for line in lines] == ["one", "two"]  # in the file before any write
        writer.failing.clear()  # the batch failed; the retry writes it
        wait_until(lambda: writer.batches and book.path.stat().st_size == 0, 10, "the batch to be written")
        assert [e["id"] for batch in writer.batches for e in batch] == ["one", "two"]
    finally:
        book.close()
    assert not book.path.exists()  # a clean exit leaves nothing


def test_only_a_dead_process_journal_is_recovered_and_a_torn_last_line_is_no_entry(tmp_path):
    alive = tmp_path / "1-1.journal"
    alive.write_text('{"id": "alive"}\n')
    holder = os.open(alive, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # its process holds it: it lives
    dead = tmp_path / "2-2.journal"
    dead.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "outp')  # killed mid-line
    writer = Recorder()
    try:
        assert journal.recover(tmp_path, writer) == 2
    finally:
        os.close(holder)
    assert [[e["id"] for e in batch] for batch in writer.batches] == [["a", "b"]]
    assert alive.exists() and not dead.exists()


def test_a_dead_process_lines_are_written_before_what_it_still_ran_is_ended(tmp_path):
    (tmp_path / "7-7.journal").write_text('{"id": "answered"}\n')
    said: list[tuple[str, list]] = []
    writer = Recorder()
    orphaned = lambda name, answered: said.append((name, answered, list(writer.batches)))  # noqa: E731
    journal.recover(tmp_path, writer, orphaned=orphaned)
    assert said == [("7-7", {"answered"}, [[{"id": "answered"}]])]  # its name and lines, once they were written


def test_a_journal_whose_orphans_could_not_be_ended_is_kept_for_the_next_recovery(tmp_path):
    (tmp_path / "8-8.journal").write_text('{"id": "answered"}\n')

    def database_away(name: str, answered: set[str]) -> None:
        raise OperationalError("the database is away")

    journal.recover(tmp_path, Recorder(), orphaned=database_away)
    assert (tmp_path / "8-8.journal").exists()


@pytest.mark.parametrize("still_running", [True, False])
def test_a_process_leaving_with_calls_still_running_keeps_its_journal_locked(tmp_path, still_running):
    book = journal.Journal(tmp_path, Recorder(), running=lambda name: still_running)
    book.close()
    assert book.path.exists() == still_running
    if still_running:  # locked until the process exits: no recovery takes it meanwhile
        assert journal.recover(tmp_path, Recorder(), orphaned=lambda *_: pytest.fail("it lives")) == 0
        os.close(book.fd)


def test_the_jobs_a_dead_process_was_running_fail_refunded_and_no_other(settings):
    api_key, _ = ApiKey.objects.issue(name="orphans")
    reserved = admission.reservation(REQUEST)
    ApiKey.objects.filter(id=api_key.id).update(calls_used=5, tokens_used=5 * reserved)
    dead, alive = "web@renamed-host/11-1", upstreamjobs.runner_name("12-1")  # found whatever the host's name
    orphan, answered, unwritten, other = (running_job(api_key) for _ in range(4))
    Job.objects.filter(id__in=[orphan.id, answered.id, unwritten.id]).update(worker=dead)
    Job.objects.filter(id=other.id).update(worker=alive)
    local = admission.create_job(api_key.id, "far", REQUEST, queue="cpu-q", status=Job.Status.RUNNING)
    Job.objects.filter(id=local.id).update(worker=dead)  # a worker's job: the reaper's, not this
    upstreamjobs.write_finishes([entry(answered)])

    lines = {str(answered.id), str(unwritten.id)}  # its line could not be written: answered all the same
    assert upstreamjobs.end_orphans("11-1", lines) == 1
    assert upstreamjobs.end_orphans("11-1", lines) == 0  # once only
    row = Job.objects.get(id=orphan.id)
    assert (row.status, row.error_code) == ("failed", upstreamjobs.GATEWAY_LOST)
    statuses = [Job.objects.get(id=job.id).status for job in (answered, unwritten, other, local)]
    assert statuses == ["succeeded", "running", "running", "running"]
    api_key.refresh_from_db()
    assert api_key.calls_used == 4  # the orphan's call given back
    assert api_key.tokens_used == 3 * reserved + 12  # its reservation released; the answered one settled
    day = UsageDay.objects.get(api_key=api_key)
    assert (day.failed, day.refunded, day.succeeded) == (1, 1, 1)


def test_writing_a_finish_twice_changes_nothing():
    api_key, _ = ApiKey.objects.issue(name="twice")
    ApiKey.objects.filter(id=api_key.id).update(calls_used=1, tokens_used=admission.reservation(REQUEST))
    job = running_job(api_key)
    line = entry(job)
    upstreamjobs.write_finishes([line])
    upstreamjobs.write_finishes([line])  # a crash between the commit and the file's truncation
    row = Job.objects.get(id=job.id)
    assert (row.status, row.prompt_tokens, row.completion_tokens, row.output) == ("succeeded", 5, 7, "the answer")
    assert row.finished_at.isoformat() == "2026-12-02T10:00:00+00:00"  # when it was answered
    api_key.refresh_from_db()
    assert api_key.tokens_used == 12  # settled once
    assert UsageDay.objects.get(api_key=api_key).succeeded == 1


@pytest.mark.parametrize("one_statement", [True, False], ids=["one-statement", "transactional"])
def test_a_batch_writes_every_job_settles_a_budgeted_one_and_skips_one_ended_meanwhile(monkeypatch, one_statement):
    if not one_statement:  # as with [limits] defaults, or on SQLite
        monkeypatch.setattr(oneround, "available", lambda: False)
    api_key, _ = ApiKey.objects.issue(name="batch")
    budgeted_key, plaintext = ApiKey.objects.issue(name="budgeted", budgets={"daily": {"tokens": 1000}})
    jobs = [running_job(api_key) for _ in range(3)]
    budgeted, _ = admission.admit_job(parse_key(plaintext), "far", REQUEST, backend="prov", status="running")
    lifecycle.fail(jobs[1].id, "upstream_error", "it failed first")
    upstreamjobs.write_finishes([entry(job) for job in [*jobs, budgeted]])
    statuses = [Job.objects.get(id=job.id).status for job in [*jobs, budgeted]]
    assert statuses == ["succeeded", "failed", "succeeded", "succeeded"]
    assert UsageDay.objects.get(api_key=api_key).succeeded == 2
    (use,) = BudgetUse.objects.filter(api_key=budgeted_key)
    assert (use.calls, use.tokens) == (1, 12)  # its reservation replaced by what it used


def test_a_batch_in_one_transaction_sums_each_key_and_day_as_its_jobs_one_by_one_would():
    keys = [ApiKey.objects.issue(name=f"summed {i}")[0] for i in range(3)]
    by_one, summed, other = keys
    reserved = admission.reservation(REQUEST)
    for api_key, calls in ((by_one, 4), (summed, 4), (other, 5)):  # what their jobs took
        ApiKey.objects.filter(id=api_key.id).update(calls_used=calls, tokens_used=calls * reserved)
    usage = [(5, 7), (1, 2), (30, 40), (0, 1)]
    made = {api_key.id: [running_job(api_key) for _ in usage] for api_key in keys}
    other_model = admission.create_job(other.id, "near", REQUEST, backend="prov", status=Job.Status.RUNNING)
    for job, (prompt, completion) in zip(made[by_one.id], usage, strict=True):
        upstreamjobs.write_batch([upstreamjobs.success_of(entry(job, prompt, completion))])
    lifecycle.fail(made[summed.id][3].id, "upstream_error", "it ended before its batch")
    lines = [entry(job, *counts) for key in (summed, other) for job, counts in zip(made[key.id], usage, strict=True)]
    lines.append(entry(other_model, 9, 9))
    ended = lifecycle.finish_all_in_transaction([upstreamjobs.success_of(line) for line in lines])
    assert [job is None for job in ended] == [False, False, False, True] + [False] * 5
    for api_key in keys:
        api_key.refresh_from_db()
    assert by_one.tokens_used == sum(p + c for p, c in usage)
    assert summed.tokens_used == sum(p + c for p, c in usage[:3])  # the failed one's reservation released
    assert other.tokens_used == sum(p + c for p, c in usage) + 18
    rollup = {(day.api_key_id, day.model): day for day in UsageDay.objects.filter(api_key__in=keys)}
    one, two = rollup[(by_one.id, "far")], rollup[(other.id, "far")]
    fields = ("requests", "succeeded", "prompt_tokens", "completion_tokens", "output_chars", "input_chars", "cost_usd")
    assert [getattr(one, name) for name in fields] == [getattr(two, name) for name in fields]
    assert (one.succeeded, one.prompt_tokens, one.completion_tokens) == (4, 36, 50)
    assert rollup[(summed.id, "far")].succeeded == 3
    assert (rollup[(other.id, "near")].succeeded, rollup[(other.id, "near")].prompt_tokens) == (1, 9)
    assert lifecycle.finish_all_in_transaction([upstreamjobs.success_of(line) for line in lines]) == [None] * 9
    other.refresh_from_db()
    assert other.tokens_used == sum(p + c for p, c in usage) + 18  # written twice, settled once


def test_the_journal_of_this_process_is_written_by_its_writer(settings, tmp_path: Path):
    api_key, _ = ApiKey.objects.issue(name="writer")
    job = running_job(api_key)
    book = journal.Journal(tmp_path, upstreamjobs.write_finishes)
    try:
        book.record(entry(job))
        wait_until(lambda: Job.objects.get(id=job.id).status == "succeeded", 10, "the writer to write the job")
    finally:
        book.close()


def test_a_closed_journal_takes_no_line_and_its_caller_writes_the_record_itself(tmp_path):
    book = journal.Journal(tmp_path, Recorder())
    book.close()
    assert not book.record({"id": "late"})  # a request that answered after the stop began
    assert list(tmp_path.iterdir()) == []


def test_a_backlog_is_written_in_bounded_batches(tmp_path):
    writer = Recorder()
    writer.failing.set()  # the database is away while lines pile up
    book = journal.Journal(tmp_path, writer)
    try:
        for number in range(journal.MAX_BATCH * 2 + 50):
            book.record({"id": str(number)})
        writer.failing.clear()
        assert book.drain(20)
    finally:
        book.close()
    sizes = [len(batch) for batch in writer.batches]
    assert sum(sizes) == journal.MAX_BATCH * 2 + 50 and max(sizes) <= journal.MAX_BATCH


def test_an_answer_the_row_would_not_keep_is_not_kept_in_the_journal_either(settings):
    api_key, _ = ApiKey.objects.issue(name="private")
    job = running_job(api_key)
    server = settings.LLM_CONFIG.server.model_copy(update={"store_payloads": False})
    settings.LLM_CONFIG = settings.LLM_CONFIG.model_copy(update={"server": server})
    line = upstreamjobs.journal_entry(job, "a private answer", 3, 4, True, None)
    assert "a private answer" not in json.dumps(line)
    upstreamjobs.write_finishes([line])
    row = Job.objects.get(id=job.id)
    assert (row.status, row.output, row.output_chars) == ("succeeded", None, len("a private answer"))
