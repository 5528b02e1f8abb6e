"""How a waiting request ends when it loses a race or Redis fails under it: it answers
with what was recorded, and a client is never charged for an error."""

import pytest
from django.utils import timezone

from apikeys.models import ApiKey
from djangollmapi.errors import ApiError
from llmjobs import events, lifecycle
from llmjobs.follow import wait_for_output
from llmjobs.models import Job
from tests.conftest import free_port

pytestmark = pytest.mark.django_db


@pytest.fixture
def charged_job():
    api_key, _ = ApiKey.objects.issue(name="k")
    ApiKey.objects.filter(id=api_key.id).update(calls_used=1)
    job = Job.objects.create(api_key=api_key, model="echo", status=Job.Status.RUNNING, started_at=timezone.now())
    return api_key, job


def test_timeout_after_the_job_succeeded_answers_the_result(redis_server, charged_job):
    api_key, job = charged_job
    lifecycle.finish(job.id, "done already")

    assert wait_for_output(job, timeout_s=0.05) == "done already"
    api_key.refresh_from_db()
    job.refresh_from_db()
    assert (job.status, job.refunded, api_key.calls_used) == (Job.Status.SUCCEEDED, False, 1)


def test_timeout_of_a_running_job_is_504_and_refunded(redis_server, charged_job):
    api_key, job = charged_job
    with pytest.raises(ApiError) as caught:
        wait_for_output(job, timeout_s=0.05)
    assert (caught.value.status, caught.value.code) == (504, "job_timeout")
    api_key.refresh_from_db()
    assert api_key.calls_used == 0


@pytest.fixture
def dead_redis(settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    events.redis_client.cache_clear()
    yield
    events.redis_client.cache_clear()


def test_redis_failing_during_the_wait_is_503_and_refunded(charged_job, dead_redis):
    api_key, job = charged_job
    with pytest.raises(ApiError) as caught:
        wait_for_output(job, timeout_s=5)
    assert (caught.value.status, caught.value.code) == (503, "broker_unavailable")
    job.refresh_from_db()
    api_key.refresh_from_db()
    assert (job.status, job.refunded, api_key.calls_used) == (Job.Status.FAILED, True, 0)
