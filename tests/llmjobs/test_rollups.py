"""The daily rollups equal a recount from the Job rows, whichever path ended each job,
count each job once, fall on the configured calendar's day, and outlive `prunejobs`."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import requests
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone

from apikeys.models import ApiKey
from llmjobs import admission, lifecycle, retention, rollups
from llmjobs.models import Job, UsageDay
from tests.gateway.test_disconnect import open_stream, read_chunks
from tests.helpers import CheckedChat, key_row, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

INTEGERS = (
    "requests",
    "succeeded",
    "failed",
    "cancelled",
    "refunded",
    "input_chars",
    "output_chars",
    "prompt_tokens",
    "completion_tokens",
)


def recount() -> dict[tuple, dict]:
    """The rollups as they should be, counted again from the ended Job rows."""
    zone = settings.LLM_CONFIG.limits.zone
    days: dict[tuple, dict] = defaultdict(lambda: defaultdict(int))
    for job in Job.objects.exclude(status__in=Job.ACTIVE).exclude(api_key=None):
        row = days[(job.created_at.astimezone(zone).date(), job.api_key_id, job.model)]
        row["requests"] += 1
        row[job.status] += 1
        row["refunded"] += int(job.refunded)
        row["input_chars"] += job.input_chars
        row["output_chars"] += job.output_chars
        row["prompt_tokens"] += job.prompt_tokens or 0
        row["completion_tokens"] += job.completion_tokens or 0
        row["cost_usd"] += job.cost_usd or Decimal(0)
        row["device_s"] += job.device_s or 0.0
    return days


def rollup_rows() -> dict[tuple, UsageDay]:
    return {(row.day, row.api_key_id, row.model): row for row in UsageDay.objects.all()}


def assert_rollups_equal_recount() -> None:
    expected, actual = recount(), rollup_rows()
    assert set(actual) == set(expected)
    for group, counts in expected.items():
        row = actual[group]
        assert {name: getattr(row, name) for name in INTEGERS} == {name: counts[name] for name in INTEGERS}, group
        assert row.cost_usd == pytest.approx(counts["cost_usd"], abs=Decimal("1e-8"))
        assert row.device_s == pytest.approx(counts["device_s"], abs=1e-5)


def post(url: str, key: str, path: str, body: dict) -> requests.Response:
    return requests.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_the_rollups_of_a_mixed_run_equal_a_recount_and_outlive_prunejobs(gateway, provider_key, make_key):
    first, second = make_key(name="first"), make_key(name="second")
    for key in (first, second):
        assert post(gateway.url, key, "/api/", {"text": "hello", "model": "echo"}).status_code == 200
    assert post(gateway.url, first, "/api/", {"text": "x", "model": "boom"}).status_code == 500  # refunded
    chat = {"model": "up-words", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 3}
    assert post(gateway.url, first, "/v1/chat/completions", chat).status_code == 200  # upstream, priced
    down = {**chat, "model": "up-down"}
    assert post(gateway.url, second, "/v1/chat/completions", down).status_code == 502  # upstream, refunded
    stream = open_stream(gateway, second)  # local, cancelled mid-stream: charged what it made
    read_chunks(stream, 2)
    stream.close()
    wait_until(
        lambda: Job.objects.filter(api_key=key_row(second), status=Job.Status.CANCELLED, tokens_settled=True).exists(),
        what="the abandoned stream recorded",
    )
    wait_until(lambda: not Job.objects.filter(status__in=Job.ACTIVE).exists(), what="every job ended")

    assert_rollups_equal_recount()
    statuses = set(Job.objects.values_list("status", flat=True))
    assert statuses == {Job.Status.SUCCEEDED, Job.Status.FAILED, Job.Status.CANCELLED}
    assert UsageDay.objects.filter(refunded__gt=0).count() >= 2 and UsageDay.objects.filter(cost_usd__gt=0).exists()
    # The provider's own key is counted where it calls: the provider's local jobs.
    assert UsageDay.objects.filter(api_key__name="provider", model="words").exists()
    before = {group: (row.requests, row.prompt_tokens, row.cost_usd) for group, row in rollup_rows().items()}

    call_command("prunejobs", "--older-than", "0s")

    assert not Job.objects.exists()
    assert {group: (row.requests, row.prompt_tokens, row.cost_usd) for group, row in rollup_rows().items()} == before
    usage = requests.get(f"{gateway.url}/api/usage/", headers={"Authorization": f"Bearer {first}"}, timeout=10).json()
    (today,) = usage["days"]
    assert (today["requests"], today["calls"], today["failed"]) == (3, 2, 1)


def new_job(api_key: ApiKey, **fields) -> Job:
    job = admission.create_job(api_key.id, "echo", CheckedChat(reserve_tokens=5, input_text="abcd"), **fields)
    return job


def test_each_ending_path_counts_a_job_once():
    api_key, _ = ApiKey.objects.issue(name="paths")
    done, failed, queued, running = (new_job(api_key) for _ in range(4))
    Job.objects.filter(id=running.id).update(status=Job.Status.RUNNING)

    assert lifecycle.finish(done.id, "out", 2, 3)
    assert not lifecycle.finish(done.id, "again", 2, 3)
    assert lifecycle.fail(failed.id, "boom", "it broke")
    assert not lifecycle.fail(failed.id, "boom", "it broke")
    assert lifecycle.cancel(queued.id)
    assert not lifecycle.record_cancelled(queued.id, 1, 1)  # never ran: nothing to charge
    assert lifecycle.cancel(running.id)  # the client left: ended now, charged when the worker stops
    assert lifecycle.record_cancelled(running.id, 2, 4)
    assert not lifecycle.record_cancelled(running.id, 2, 4)

    assert_rollups_equal_recount()
    (row,) = UsageDay.objects.all()
    assert (row.requests, row.succeeded, row.failed, row.cancelled, row.refunded) == (4, 1, 1, 2, 1)
    assert (row.prompt_tokens, row.completion_tokens, row.input_chars) == (4, 7, 16)
    reserved = admission.reservation(CheckedChat(reserve_tokens=5, input_text="abcd"))
    assert ApiKey.objects.get(id=api_key.id).tokens_used == 4 + 7 - 4 * reserved  # reservations released


@pytest.mark.parametrize(
    "made_at, zone, day",
    [
        ("2026-03-01T22:30:00", "UTC", "2026-03-01"),
        ("2026-03-01T22:30:00", "Europe/Berlin", "2026-03-01"),  # 23:30 there
        ("2026-03-01T23:30:00", "Europe/Berlin", "2026-03-02"),  # 00:30 there: the next day
        ("2026-07-01T22:30:00", "Europe/Berlin", "2026-07-02"),  # summer time: 00:30
        ("2026-03-02T03:00:00", "America/New_York", "2026-03-01"),  # 22:00 the day before
    ],
)
def test_a_call_counts_on_its_day_in_the_configured_zone(made_at, zone, day):
    config = settings.LLM_CONFIG.model_copy(
        update={"limits": settings.LLM_CONFIG.limits.model_copy(update={"timezone": zone})}
    )
    made = datetime.fromisoformat(made_at).replace(tzinfo=UTC)
    with override_settings(LLM_CONFIG=config):
        assert rollups.usage_day(made).isoformat() == day
        assert rollups.usage_day(made.replace(tzinfo=None).isoformat(sep=" ")).isoformat() == day  # SQLite's text


def test_rollups_switched_off_count_nothing():
    api_key, _ = ApiKey.objects.issue(name="off")
    server = settings.LLM_CONFIG.server.model_copy(update={"usage_rollups": False})
    with override_settings(LLM_CONFIG=settings.LLM_CONFIG.model_copy(update={"server": server})):
        assert lifecycle.finish(new_job(api_key).id, "out", 1, 1)
    assert not UsageDay.objects.exists()


def test_prunejobs_drops_old_ended_jobs_only():
    api_key, _ = ApiKey.objects.issue(name="old")
    old_done, old_running, recent = (new_job(api_key) for _ in range(3))
    lifecycle.finish(old_done.id, {"text": "out"}, 1, 1)
    lifecycle.finish(recent.id, {"text": "out"}, 1, 1)
    Job.objects.filter(id=old_running.id).update(status=Job.Status.RUNNING)
    long_ago = timezone.now() - timedelta(days=31)
    Job.objects.filter(id__in=[old_done.id, old_running.id]).update(created_at=long_ago)

    call_command("prunejobs", "--older-than", "30d", "--payloads-only")
    assert Job.objects.get(id=old_done.id).input_text == "" and Job.objects.get(id=old_done.id).output is None
    assert Job.objects.get(id=recent.id).output == {"text": "out"}

    call_command("prunejobs", "--older-than", "30d")
    assert set(Job.objects.values_list("id", flat=True)) == {old_running.id, recent.id}
    assert UsageDay.objects.get().requests == 2  # the rollups keep the pruned job


@pytest.mark.parametrize("age", ["30", "d", "-1d", "1y", "1.5d", ""])
def test_prunejobs_refuses_an_age_it_cannot_read(age):
    with pytest.raises(CommandError, match="is not an age"):
        call_command("prunejobs", f"--older-than={age}")


def test_ages_read_as_durations():
    assert retention.parse_age("30d") == timedelta(days=30)
    assert retention.parse_age("2w") == timedelta(weeks=2)
    assert retention.parse_age("90m") == timedelta(minutes=90)
    assert json.dumps(str(retention.parse_age("3600s"))) == '"1:00:00"'
