"""Budgets per calendar period: taken with the call, exact under concurrency, settled
on what calls used, reset at midnight in the configured zone (the clock injected)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
import requests
from django.conf import settings
from django.db import transaction
from django.test import override_settings

from apikeys import budgets
from apikeys.keys import parse_key
from apikeys.models import ApiKey, BudgetUse
from djangollmapi.errors import ApiError
from llmjobs import admission, lifecycle
from llmjobs.models import Job
from tests.helpers import CheckedChat, error_of, key_row, recorded

pytestmark = pytest.mark.django_db(transaction=True)

BERLIN = settings.LLM_CONFIG.model_copy(
    update={"limits": settings.LLM_CONFIG.limits.model_copy(update={"timezone": "Europe/Berlin"})}
)


@pytest.fixture
def clock(monkeypatch):
    """Admission's clock, set by the test: `clock("2026-03-01T22:59:00+00:00")`."""

    def set_to(moment: str) -> None:
        monkeypatch.setattr(budgets, "now", lambda: datetime.fromisoformat(moment))

    return set_to


def admit(plaintext: str, request: CheckedChat | None = None) -> Job:
    """What a view does for a local call, up to the job's row."""
    request = request or CheckedChat()
    with transaction.atomic():
        admitted = admission.admit(parse_key(plaintext), "echo", request)
        return admission.create_admitted_job(admitted, "echo", request, queue="dla.device.cpu")


def refusal(plaintext: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        admit(plaintext)
    return caught.value


def test_a_daily_budget_resets_at_local_midnight(make_key, clock):
    key = make_key(budgets={"daily": {"calls": 2}})
    with override_settings(LLM_CONFIG=BERLIN):
        clock("2026-03-01T22:30:00+00:00")  # 23:30 in Berlin
        admit(key), admit(key)
        refused = refusal(key)
        assert (refused.status, refused.code) == (429, "budget_exhausted")
        assert "daily budget of 2 calls is used up" in refused.message
        assert "resets at 2026-03-02T00:00:00+01:00 (Europe/Berlin)" in refused.message
        assert refused.headers["Retry-After"] == str(30 * 60 + 1)
        assert key_row(key).calls_used == 2  # the refusal took nothing

        clock("2026-03-01T22:59:59+00:00")  # still the same day there
        assert refusal(key).code == "budget_exhausted"
        clock("2026-03-01T23:00:00+00:00")  # midnight in Berlin, 23:00 in UTC
        admit(key)
    uses = {(use.starts, use.calls) for use in BudgetUse.objects.filter(period="daily")}
    assert uses == {(date(2026, 3, 1), 2), (date(2026, 3, 2), 1)}


@pytest.mark.parametrize(
    "period, day, starts, ends",
    [
        ("daily", date(2026, 3, 29), date(2026, 3, 29), "2026-03-30T00:00:00+02:00"),  # summer time begins
        ("weekly", date(2026, 12, 3), date(2026, 11, 30), "2026-12-07T00:00:00+01:00"),  # Monday to Monday
        ("monthly", date(2026, 2, 14), date(2026, 2, 1), "2026-03-01T00:00:00+01:00"),
        ("monthly", date(2026, 12, 31), date(2026, 12, 1), "2027-01-01T00:00:00+01:00"),
    ],
)
def test_periods_begin_on_calendar_boundaries(period, day, starts, ends):
    with override_settings(LLM_CONFIG=BERLIN):
        assert budgets.period_start(period, day) == starts
        assert budgets.period_end(period, starts).isoformat() == ends


def test_a_refunded_call_gives_its_call_back_and_tokens_settle_on_use(make_key, clock):
    clock("2026-05-05T12:00:00+00:00")
    request = CheckedChat(reserve_tokens=10, input_text="hi")
    reserved = admission.reservation(request)
    key = make_key(budgets={"daily": {"calls": 1, "tokens": reserved + 5}, "monthly": {"tokens": 10_000}})
    failed = admit(key, request)
    assert refusal(key).code == "budget_exhausted"  # one call a day, taken
    lifecycle.fail(failed.id, "job_failed", "it broke")  # refunded: the call is given back
    done = admit(key, request)
    lifecycle.finish(done.id, "out", 2, 1)
    daily = BudgetUse.objects.get(period="daily")
    monthly = BudgetUse.objects.get(period="monthly")
    assert (daily.calls, daily.tokens) == (1, 3) and (monthly.calls, monthly.tokens) == (1, 3)
    assert monthly.starts == date(2026, 5, 1)


def test_the_default_budgets_come_from_limits(make_key, clock):
    clock("2026-05-05T12:00:00+00:00")
    config = settings.LLM_CONFIG.model_copy(
        update={"limits": settings.LLM_CONFIG.limits.model_copy(update={"weekly_calls": 1})}
    )
    with override_settings(LLM_CONFIG=config):
        key = make_key()
        own = make_key(budgets={"weekly": {"calls": 3}})
        admit(key)
        assert "weekly budget of 1 calls" in refusal(key).message
        admit(own), admit(own)  # the key's own budget wins


def test_a_device_time_budget_lets_calls_in_while_time_is_left(make_key, clock):
    clock("2026-05-05T12:00:00+00:00")
    key = make_key(budgets={"daily": {"device_s": 1.0}})
    job = admit(key)
    lifecycle.finish(job.id, "out", 1, 1, device=lifecycle.DeviceUse(1.5, 1, datetime(2026, 5, 5, 12, tzinfo=UTC)))
    assert BudgetUse.objects.get().device_s == 1.5
    assert "daily budget of 1 device-seconds" in refusal(key).message


def test_60_concurrent_calls_on_a_spend_budget_that_fits_25_charge_exactly_25(gateway, provider_key, make_key):
    """`up-priced` costs 1,000 USD per million output tokens and nothing for input: 4
    tokens out (of a 6-word prompt) cost 0.004 USD, exactly what each call reserves."""
    key = make_key(budgets={"daily": {"spend_usd": 0.1}})
    body = {"model": "up-priced", "messages": [{"role": "user", "content": "a b c d e f"}], "max_tokens": 4}

    def post(_: int) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return requests.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(60) as pool:
        replies = list(pool.map(post, range(60)))

    ok = [reply for reply in replies if reply.status_code == 200]
    refused = [reply for reply in replies if reply.status_code != 200]
    assert {(reply.status_code, error_of(reply)["code"]) for reply in refused} == {(429, "budget_exhausted")}
    assert len(ok) == 25
    row = recorded(key)
    jobs = Job.objects.filter(api_key=row)
    assert row.calls_used == 25 and jobs.count() == 25
    assert sum(job.cost_usd for job in jobs) == Decimal("0.1")
    assert BudgetUse.objects.get(api_key=row, period="daily").spend_usd == pytest.approx(0.1)
    assert "daily budget of 0.1 USD of spend" in error_of(refused[0])["message"]


@pytest.mark.parametrize(
    "value, valid",
    [
        ({}, True),
        ({"daily": {"calls": 5, "tokens": 100, "spend_usd": 1.5, "device_s": 60}}, True),
        ({"monthly": {"spend_usd": 0}}, True),
        ({"hourly": {"calls": 5}}, False),
        ({"daily": {"calls": 1.5}}, False),
        ({"daily": {"calls": -1}}, False),
        ({"daily": {"dollars": 1}}, False),
        ({"daily": {}}, False),
        ({"daily": {"calls": True}}, False),
        ([], False),
    ],
)
def test_key_budgets_are_checked(value, valid):
    from apikeys.models import valid_budgets

    assert valid_budgets(value) is valid
    if not valid:
        with pytest.raises(Exception, match="periods are daily"):
            ApiKey(name="x", budgets=value).clean()
