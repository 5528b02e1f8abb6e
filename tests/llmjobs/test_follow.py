"""Following a job, in-process on the real Redis stream and database: the typed events,
the ending a follower reports, and a follow abandoned before the end cancelling its job.
(The worker's side is stood in for by writing its events to the job's stream.)"""

from __future__ import annotations

import pytest

from apikeys.models import ApiKey
from djangollmapi.errors import ApiError
from llmjobs import admission, events, lifecycle
from llmjobs.follow import Done, Failed, Token, follow_job, wait_for_output
from llmjobs.models import Job
from llmjobs.routing import device_queue_name
from tests.helpers import CheckedChat

pytestmark = pytest.mark.django_db(transaction=True)


def queued_job() -> Job:
    """A charged, queued job with its reservation taken, as admission leaves one."""
    api_key, _ = ApiKey.objects.issue(name="follow", max_tokens_total=100)
    request = CheckedChat(input_text="a b c")
    ApiKey.objects.filter(id=api_key.id).update(calls_used=1, tokens_used=admission.reservation(request))
    return admission.create_job(api_key.id, "words", request, queue=device_queue_name("cpu"))


def key_of(job: Job) -> ApiKey:
    return ApiKey.objects.get(id=job.api_key_id)


def test_tokens_then_the_outcome(redis_server):
    job = queued_job()
    for piece in ("one ", "two"):
        events.emit(str(job.id), "token", text=piece)
    events.emit(str(job.id), "done", output={"text": "one two"})
    followed = list(follow_job(job, timeout_s=5, client_gone=lambda: False))
    assert followed == [Token("one two"), Done({"text": "one two"})]  # tokens that came together, joined


def test_an_error_event_is_the_clients_error_with_the_job_id(redis_server):
    job = queued_job()
    events.emit(str(job.id), "error", code="job_time_limit", message="stopped")
    (failed,) = follow_job(job, timeout_s=5)
    assert isinstance(failed, Failed)
    error = failed.error
    assert (error.status, error.code) == (504, "job_timeout")  # the worker's limit reads as ours
    assert str(job.id) in error.message


def test_a_follow_whose_client_left_cancels_the_job_and_frees_its_reservation(redis_server):
    job = queued_job()
    assert list(follow_job(job, timeout_s=5, client_gone=lambda: True)) == []
    job.refresh_from_db()
    assert (job.status, job.tokens_settled) == (Job.Status.CANCELLED, True)
    assert events.is_cancelled(str(job.id))  # the worker will not start it
    assert (key_of(job).calls_used, key_of(job).tokens_used) == (1, 0)  # charged the call, not the tokens


def test_a_follow_its_reader_abandons_cancels_the_job(redis_server):
    job = queued_job()
    events.emit(str(job.id), "token", text="partial")
    followed = follow_job(job, timeout_s=5, client_gone=lambda: False)
    assert next(followed) == Token("partial")
    followed.close()  # the response stopped reading: a failed write
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED


def test_a_finished_follow_cancels_nothing(redis_server):
    job = queued_job()
    lifecycle.start(str(job.id), "worker@test")
    lifecycle.complete(str(job.id), lifecycle.Outcome("out", "out", 3, 2))
    followed = follow_job(job, timeout_s=5, client_gone=lambda: False)
    assert next(followed) == Done("out")
    followed.close()
    job.refresh_from_db()
    assert (job.status, key_of(job).tokens_used) == (Job.Status.SUCCEEDED, 5)


def test_a_wait_that_runs_out_times_the_job_out_and_refunds_it(redis_server):
    job = queued_job()
    with pytest.raises(ApiError) as caught:
        wait_for_output(job, timeout_s=0.05)
    assert (caught.value.status, caught.value.code) == (504, "job_timeout")
    job.refresh_from_db()
    assert (job.status, job.refunded) == (Job.Status.FAILED, True)
    assert (key_of(job).calls_used, key_of(job).tokens_used) == (0, 0)
