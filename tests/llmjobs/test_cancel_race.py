"""A client that leaves just after the last token: the job was cancelled between the
worker's last emit and its final write. It keeps its tokens and is charged exactly."""

from __future__ import annotations

import pytest

from apikeys.models import ApiKey
from llmjobs import admission, lifecycle
from llmjobs.models import Job
from llmjobs.routing import device_queue_name
from tests.helpers import CheckedChat

pytestmark = pytest.mark.django_db(transaction=True)


def running_job(reserve: int) -> Job:
    api_key, _ = ApiKey.objects.issue(name="race", max_tokens_total=100)
    request = CheckedChat(reserve, "a b c")
    reserved = admission.reservation(request)  # max_tokens and the prompt's bound
    ApiKey.objects.filter(id=api_key.id).update(tokens_used=reserved)  # what the admission reserved
    job = admission.create_job(api_key.id, "words", request, queue=device_queue_name("cpu"))
    assert lifecycle.start(str(job.id), "worker@test")
    return job


def test_a_job_cancelled_after_its_last_token_is_charged_what_it_made(redis_server):
    job = running_job(reserve=10)
    assert lifecycle.cancel(job.id)  # the stream closed: running -> cancelled
    result = {"text": "a b c", "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 3}
    lifecycle.complete(str(job.id), lifecycle.Outcome(result, result, 3, 3))

    job.refresh_from_db()
    assert (job.status, job.prompt_tokens, job.completion_tokens, job.tokens_settled) == (
        Job.Status.CANCELLED,
        3,
        3,
        True,
    )
    assert ApiKey.objects.get(id=job.api_key_id).tokens_used == 6  # not the 10 reserved


def test_a_finished_job_is_charged_once(redis_server):
    job = running_job(reserve=10)
    result = {"text": "a", "finish_reason": "stop", "prompt_tokens": 2, "completion_tokens": 1}
    lifecycle.complete(str(job.id), lifecycle.Outcome(result, result, 2, 1))
    lifecycle.complete(str(job.id), lifecycle.Outcome(result, result, 2, 1))  # a redelivery

    job.refresh_from_db()
    assert (job.status, job.tokens_settled) == (Job.Status.SUCCEEDED, True)
    assert ApiKey.objects.get(id=job.api_key_id).tokens_used == 3
