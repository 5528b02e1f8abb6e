"""The job lifecycle's own rules, in-process on the real database: the row it records,
and the billing policy of upstream calls (who pays for a provider's refusal, what an
answer without usage costs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from apikeys.models import ApiKey
from djangollmapi.config import parse_config
from djangollmapi.routes import route_model
from llmjobs import admission, journal, lifecycle, upstreamjobs
from llmjobs.models import Job
from tests.helpers import CheckedChat

pytestmark = pytest.mark.django_db(transaction=True)

CONFIG = parse_config(
    {
        "deployments": [{"name": "echo", "algorithm": "algorithms.echo:Echo"}],
        "upstreams": [
            {
                "name": "prov",
                "base_url": "https://p.example/v1",
                "models": {"far": "their-far"},
                "prices": {"far": {"input": 1.0, "output": 2.0}},
            }
        ],
    },
    "<test>",
    base_dir=Path("/tmp"),
)


REQUEST = CheckedChat(reserve_tokens=20, input_text="twelve chars")
RESERVED = admission.reservation(REQUEST)  # max_tokens 20 and the prompt's bound


def charged_key() -> ApiKey:
    api_key, _ = ApiKey.objects.issue(name="lifecycle")
    ApiKey.objects.filter(id=api_key.id).update(calls_used=1, tokens_used=RESERVED)
    return api_key


def upstream_job(api_key: ApiKey) -> Job:
    """A job for the provider's model, running, as `open_upstream` records it."""
    return admission.create_job(api_key.id, "far", REQUEST, backend="prov", status=Job.Status.RUNNING)


def test_the_recorded_row_is_the_job_it_returns():
    api_key = charged_key()
    job = upstream_job(api_key)
    row = Job.objects.get(id=job.id)
    fields = [f.attname for f in Job._meta.concrete_fields]
    assert {name: getattr(row, name) for name in fields} == {name: getattr(job, name) for name in fields}
    assert (row.kind, row.backend, row.input_chars, row.tokens_reserved) == (
        "chat",
        "prov",
        12,
        20 + 12 + admission.TEMPLATE_TOKENS,
    )
    assert row.started_at == row.created_at and row.output is None and not row.refunded


@pytest.mark.parametrize(
    "status, refunded",
    [
        *[(400, False), (404, False), (422, False)],  # the client's own request
        *[(401, True), (403, True), (408, True), (409, True), (429, True)],  # our secret, our limits there
        *[(502, True), (503, True), (504, True)],  # the provider or the way to it failed
    ],
)
def test_a_providers_refusal_is_refunded_unless_it_is_the_clients_fault(status, refunded):
    api_key = charged_key()
    job = upstream_job(api_key)
    upstreamjobs.fail_upstream(job, status, "some_code", "refused")
    job.refresh_from_db()
    api_key.refresh_from_db()
    assert (job.status, job.refunded, api_key.calls_used) == (Job.Status.FAILED, refunded, 0 if refunded else 1)
    assert api_key.tokens_used == 0  # the reservation is released either way


def test_an_answer_without_usage_is_charged_an_estimate_at_the_price():
    api_key = charged_key()
    route = route_model("far", CONFIG)
    job = upstream_job(api_key)
    charged = upstreamjobs.finish_upstream(job, route, "the answer", usage=None, pieces=5)
    assert charged == (3, 5)  # 12 characters at ~4 a token, one token per streamed piece
    assert journal.drain()  # written behind the answer ([server] write_behind)
    job.refresh_from_db()
    api_key.refresh_from_db()
    assert (job.prompt_tokens, job.completion_tokens, float(job.cost_usd)) == (3, 5, (3 * 1.0 + 5 * 2.0) / 1e6)
    assert api_key.tokens_used == 8  # the reservation replaced by what was charged


def test_an_output_no_column_can_hold_is_stored_as_a_faithful_copy():
    api_key = charged_key()
    job = admission.create_job(
        api_key.id, "echo", CheckedChat(reserve_tokens=0, input_text="x"), status=Job.Status.RUNNING
    )
    made = {"text": "a\x00b\ud800c", "parts": ["\x00"]}  # a model's bytes: NUL, a lone surrogate
    assert lifecycle.finish(job.id, made, 1, 3)
    row = Job.objects.get(id=job.id)
    assert row.status == Job.Status.SUCCEEDED
    assert row.output == {"text": "a\ufffdb\ufffdc", "parts": ["\ufffd"]}


def test_a_queued_job_is_claimed_once_and_an_ended_one_never():
    api_key = charged_key()
    job = admission.create_job(api_key.id, "echo", REQUEST, queue="dla.cpu")
    assert lifecycle.start(str(job.id), "cpu@a")
    assert not lifecycle.start(str(job.id), "cpu@b")  # running already: the second claim loses
    row = Job.objects.get(id=job.id)
    assert (row.status, row.worker) == (Job.Status.RUNNING, "cpu@a") and row.started_at is not None
    ended = admission.create_job(api_key.id, "echo", REQUEST, queue="dla.cpu")
    assert lifecycle.cancel(ended.id)
    assert not lifecycle.start(str(ended.id), "cpu@a")
    assert Job.objects.get(id=ended.id).status == Job.Status.CANCELLED
