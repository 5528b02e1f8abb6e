"""A fault while a job is followed is not a client leaving: a stream ends with the
500 event and the job is failed and refunded, as a server fault always is; a plain
wait raises (the client gets the 500) and leaves the job to its worker. In-process, on
the real Redis stream and database, with a terminal event the follower cannot read."""

from __future__ import annotations

import pytest

from algorithms.base import GenerationRequest
from apikeys.models import ApiKey
from gateway.protocol.requests import GenerationCall
from gateway.streaming import generation_stream
from llmjobs import admission, events
from llmjobs.follow import wait_for_output
from llmjobs.models import Job
from llmjobs.routing import device_queue_name
from tests.helpers import CheckedChat

pytestmark = pytest.mark.django_db(transaction=True)

CALL = GenerationCall(
    Job.Kind.CHAT, GenerationRequest(max_tokens=8, messages=({"role": "user", "content": "hi"},)), True, False, "hi"
)


def job_with_a_broken_ending() -> Job:
    api_key, _ = ApiKey.objects.issue(name="faults")
    reserved = admission.reservation(CheckedChat())  # what admission took
    ApiKey.objects.filter(id=api_key.id).update(calls_used=1, tokens_used=reserved)
    job = admission.create_job(api_key.id, "words", CheckedChat(), queue=device_queue_name("cpu"))
    events.emit(str(job.id), "done")  # a `done` without its output
    return job


def test_a_fault_in_a_stream_fails_and_refunds_the_job(redis_server):
    job = job_with_a_broken_ending()
    chunks = list(generation_stream(job, CALL, timeout_s=5, client_gone=lambda: False))
    assert b'"code":"internal_error"' in chunks[-1]
    job.refresh_from_db()
    assert (job.status, job.error_code, job.refunded, job.tokens_settled) == (
        Job.Status.FAILED,
        "internal_error",
        True,
        True,
    )
    key = ApiKey.objects.get(id=job.api_key_id)
    assert (key.calls_used, key.tokens_used) == (0, 0)


def test_a_fault_in_a_plain_wait_leaves_the_job_to_its_worker(redis_server):
    job = job_with_a_broken_ending()
    with pytest.raises(KeyError):
        wait_for_output(job, timeout_s=5)
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED  # not cancelled: nobody went away
