"""The one-statement admission and finish (`llmjobs.oneround`), in-process on the real
database: on PostgreSQL each is one statement and writes exactly what the
transactional path writes; a key or job that needs more takes that path, whose every
check still holds."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext, override_settings

from apikeys import budgets
from apikeys.keys import parse_key
from apikeys.models import ApiKey, BudgetUse
from djangollmapi.errors import ApiError
from llmjobs import admission, lifecycle, oneround
from llmjobs.models import Job, UsageDay
from tests.helpers import CheckedChat, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

REQUEST = CheckedChat(reserve_tokens=20, input_text="twelve chars")
RESERVED = admission.reservation(REQUEST)
on_postgresql = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="the one-statement paths are PostgreSQL's (SQLite has no data-modifying CTEs)",
)


@pytest.fixture(autouse=True)
def fresh_memo():
    oneround.full_path_until.clear()
    yield
    oneround.full_path_until.clear()


def issued(**fields) -> tuple[ApiKey, object]:
    api_key, plaintext = ApiKey.objects.issue(name="oneround", **fields)
    return api_key, parse_key(plaintext)


def admitted(presented, model: str = "echo") -> tuple[Job, list[dict]]:
    with CaptureQueriesContext(connection) as queries:
        job, _weight = admission.admit_job(presented, model, REQUEST, backend="prov", status=Job.Status.RUNNING)
    return job, queries.captured_queries


def refusal(presented, model: str = "echo") -> ApiError:
    with pytest.raises(ApiError) as refused:
        admitted(presented, model)
    return refused.value


def finished(job: Job) -> list[dict]:
    if connection.vendor == "postgresql":
        oneround.zone_known(settings.LLM_CONFIG.limits.timezone)  # read once a process
    with CaptureQueriesContext(connection) as queries:
        assert lifecycle.finish(job.id, "the answer", 7, 3, cost_usd=0.00042)
    return queries.captured_queries


def rollup_of(api_key: ApiKey) -> dict:
    row = UsageDay.objects.get(api_key=api_key)
    names = ("requests", "succeeded", "input_chars", "output_chars", "prompt_tokens", "completion_tokens", "cost_usd")
    return {name: getattr(row, name) for name in names} | {"day": row.day}


@on_postgresql
def test_admission_and_finish_are_one_statement_each_and_write_what_the_transaction_writes(monkeypatch):
    fast_key, fast = issued()
    slow_key, slow = issued()
    job, queries = admitted(fast)
    assert len(queries) == 1, [q["sql"][:80] for q in queries]
    assert len(finished(job)) == 1
    monkeypatch.setattr(oneround, "available", lambda: False)  # its twin: the transactional path
    twin, twin_queries = admitted(slow)
    assert len(twin_queries) > 1
    assert len(finished(twin)) > 1

    fields = [f.attname for f in Job._meta.concrete_fields if f.attname not in {"id", "api_key_id", "created_at"}]
    fields = [name for name in fields if name not in {"started_at", "finished_at"}]
    one, other = Job.objects.get(id=job.id), Job.objects.get(id=twin.id)
    assert {n: getattr(one, n) for n in fields} == {n: getattr(other, n) for n in fields}
    assert (one.status, one.tokens_settled, one.prompt_tokens, one.cost_usd) == (
        "succeeded",
        True,
        7,
        Decimal("0.00042"),
    )
    for api_key in (fast_key, slow_key):
        api_key.refresh_from_db()
        assert (api_key.calls_used, api_key.tokens_used) == (1, 10)  # reserved RESERVED, settled to 7 + 3
    assert rollup_of(fast_key) == rollup_of(slow_key)
    assert rollup_of(fast_key)["input_chars"] == len(REQUEST.input_text)


@on_postgresql
@pytest.mark.parametrize(
    ("made_at", "zone", "day"),
    [
        ("2026-03-01T23:30:00", "Europe/Berlin", "2026-03-02"),  # 00:30 there: the next day
        ("2026-07-01T22:30:00", "Europe/Berlin", "2026-07-02"),  # summer time: 00:30
        ("2026-03-02T03:00:00", "America/New_York", "2026-03-01"),  # 22:00 the day before
    ],
)
def test_the_one_statement_finish_counts_the_day_in_the_configured_zone(monkeypatch, made_at, zone, day):
    config = settings.LLM_CONFIG.model_copy(
        update={"limits": settings.LLM_CONFIG.limits.model_copy(update={"timezone": zone})}
    )
    monkeypatch.setattr(budgets, "now", lambda: datetime.fromisoformat(made_at).replace(tzinfo=UTC))
    api_key, presented = issued()
    with override_settings(LLM_CONFIG=config):
        job, _ = admitted(presented)
        assert len(finished(job)) == 1
    assert rollup_of(api_key)["day"].isoformat() == day


def test_a_key_with_its_own_limits_is_held_to_them():
    _limited, presented = issued(rpm=1)
    admitted(presented)
    assert refusal(presented).code == "rate_limit_exceeded"
    if connection.vendor == "postgresql":
        assert presented.prefix in oneround.full_path_until  # its next calls skip the one-statement try


def test_a_model_the_key_may_not_use_is_refused_and_nothing_is_written():
    api_key, presented = issued(allowed_models=["other"])
    assert refusal(presented, model="echo").code == "model_not_allowed"
    api_key.refresh_from_db()
    assert (api_key.calls_used, api_key.tokens_used, Job.objects.count()) == (0, 0, 0)
    job, _ = admitted(presented, model="other")  # a model on its list passes
    assert job.api_key_id == api_key.id


def test_a_spent_quota_refuses_with_its_reason_and_writes_nothing():
    api_key, presented = issued(max_calls=1)
    admitted(presented)
    assert refusal(presented).code == "quota_exhausted"
    assert Job.objects.filter(api_key=api_key).count() == 1


def test_a_budgeted_job_settles_its_periods_whichever_path_admitted_it():
    api_key, presented = issued(budgets={"daily": {"tokens": 1000}})
    job, _ = admitted(presented)
    assert job.budgeted
    finished(job)
    (use,) = BudgetUse.objects.filter(api_key=api_key, period="daily")
    assert (use.calls, use.tokens) == (1, 10)  # the reservation replaced by what it used
    assert Job.objects.get(id=job.id).status == Job.Status.SUCCEEDED


@on_postgresql
def test_the_one_statement_finish_locks_its_key_before_its_rollup():
    """The order of every other ending (key, then the day's rollup): a finish waiting
    for its key's row holds no lock on the rollup's, so it cannot deadlock with them."""
    api_key, presented = issued()
    finished(admitted(presented)[0])  # the day's rollup row exists
    job, _ = admitted(presented)
    key_locked, release, done = threading.Event(), threading.Event(), []

    def hold_the_key() -> None:
        with transaction.atomic():
            ApiKey.objects.select_for_update().get(id=api_key.id)
            key_locked.set()
            release.wait(10)
        connection.close()

    def finish_the_job() -> None:
        done.append(lifecycle.finish(job.id, "late", 1, 1))
        connection.close()

    holder = threading.Thread(target=hold_the_key)
    holder.start()
    assert key_locked.wait(10)
    finisher = threading.Thread(target=finish_the_job)
    finisher.start()
    try:
        wait_until(lambda: waiting_on_a_lock(), 10, "the finish to wait for the key's row")
        with transaction.atomic():  # the rollup's row is free meanwhile
            UsageDay.objects.select_for_update(nowait=True).get(api_key=api_key)
    finally:
        release.set()
        holder.join(10)
        finisher.join(10)
    assert done == [True]
    assert UsageDay.objects.get(api_key=api_key).succeeded == 2


def waiting_on_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
        return cursor.fetchone()[0] > 0
