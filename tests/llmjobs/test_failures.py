"""Server-side failures: a JSON error with the right status in bounded time, and the
call refunded."""

import time

import pytest

from djangollmapi import processes
from llmjobs.models import Job
from tests.conftest import free_port, start_web, wait_for_http
from tests.helpers import error_of, key_row, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_algorithm_that_raises_is_500_job_failed_and_refunded(live, key):
    response = live.post("/api/", key, json={"text": "hi", "model": "boom"})
    assert response.status_code == 500
    error = error_of(response)
    assert (error["code"], error["type"]) == ("job_failed", "server_error")
    assert "secret internal detail" not in response.text
    assert "Traceback" not in response.text
    job = Job.objects.get(model="boom")
    assert job.status == Job.Status.FAILED and job.refunded
    assert key_row(key).calls_used == 0


def test_no_worker_is_503_fast_and_refunded(live, key):
    started = time.monotonic()
    response = live.post("/api/", key, json={"text": "hi", "model": "orphan"})
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    assert error_of(response)["code"] == "no_worker"
    assert Job.objects.get(model="orphan").status == Job.Status.FAILED
    assert key_row(key).calls_used == 0


def test_job_longer_than_its_timeout_is_504_and_refunded(live, key):
    started = time.monotonic()
    response = live.post("/api/", key, json={"text": "hi", "model": "sleeper"})
    assert time.monotonic() - started < 2.5
    assert response.status_code == 504
    error = error_of(response)
    assert (error["code"], error["type"]) == ("job_timeout", "timeout_error")
    job = Job.objects.get(model="sleeper")
    # Failed by the waiting request (job_timeout) or the worker's limit, whichever came first.
    assert (job.status, job.refunded) == (Job.Status.FAILED, True)
    assert job.error_code in ("job_timeout", "job_time_limit")
    assert key_row(key).calls_used == 0
    # The worker finishing late must not overwrite the failure: once a job queued
    # behind it on the same device has run, the worker is done with this one.
    after = live.post("/api/jobs/", key, json={"text": "next", "model": "long-job"}).json()["job_id"]
    wait_until(lambda: Job.objects.filter(id=after, status=Job.Status.SUCCEEDED).exists(), 20, "the next job")
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED


@pytest.fixture
def web_with(live):
    """A second web server with one setting broken, sharing everything else."""
    started = []

    def start(**env):
        port = free_port()
        process = start_web(port, **env)
        started.append(process)
        wait_for_http(f"http://127.0.0.1:{port}/", process)
        return f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        processes.stop(process)


def test_broker_down_is_503_fast_and_refunded(live, key, web_with):
    import requests

    url = web_with(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    response = requests.post(f"{url}/api/", headers={"Authorization": f"Bearer {key}"}, json={"text": "hi"}, timeout=30)
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    assert error_of(response)["code"] == "broker_unavailable"
    assert key_row(key).calls_used == 0


def test_database_down_is_503(live, key, web_with):
    import requests

    url = web_with(DATABASE_URL=f"postgres://nobody@127.0.0.1:{free_port()}/nothing")
    response = requests.post(f"{url}/api/", headers={"Authorization": f"Bearer {key}"}, json={"text": "hi"}, timeout=30)
    assert response.status_code == 503
    assert error_of(response)["code"] == "database_unavailable"


def test_output_that_is_not_json_fails_the_job_at_once(live, key):
    started = time.monotonic()
    response = live.post("/api/", key, json={"text": "hi", "model": "bad-output"})
    assert time.monotonic() - started < 5
    assert response.status_code == 500
    assert error_of(response)["code"] == "job_failed"
    job = Job.objects.get(model="bad-output")
    assert (job.status, job.refunded) == (Job.Status.FAILED, True)
    assert key_row(key).calls_used == 0
