"""`POST /api/jobs/` → 202 + Location; the job is readable only by its own key."""

import pytest

from tests.helpers import error_of, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def poll(live, key, location, until=("succeeded", "failed"), timeout_s=30):
    def ended():
        body = live.get(location.removeprefix(live.url), key).json()
        return body if body["status"] in until else None

    return wait_until(ended, timeout_s, f"job at {location} ending")


def test_async_job_runs_and_reports_its_result(live, key):
    response = live.post("/api/jobs/", key, json={"text": "later", "model": "echo"})
    assert response.status_code == 202
    assert response.json()["status"] == "queued"
    body = poll(live, key, response.headers["Location"])
    assert body["status"] == "succeeded"
    assert body["result"] == {"message": "later"}


def test_queued_job_reports_its_position(live, key):
    ahead = [live.post("/api/jobs/", key, json={"text": "a", "model": "delay-cpu1"}) for _ in range(3)]
    last = live.post("/api/jobs/", key, json={"text": "b", "model": "delay-cpu1"})
    body = live.get(last.headers["Location"].removeprefix(live.url), key).json()
    assert body["status"] == "queued"
    assert 1 <= body["queue_position"] <= 3
    for response in [*ahead, last]:
        poll(live, key, response.headers["Location"])


def test_failed_async_job_reports_its_error_and_refunds(live, key):
    response = live.post("/api/jobs/", key, json={"text": "x", "model": "boom"})
    body = poll(live, key, response.headers["Location"])
    assert body["status"] == "failed"
    assert body["error"]["code"] == "job_failed"
    assert live.get("/api/usage/", key).json()["key"]["calls_used"] == 0


def test_another_keys_job_is_404(live, make_key):
    owner, stranger = make_key(), make_key()
    location = live.post("/api/jobs/", owner, json={"text": "x", "model": "echo"}).headers["Location"]
    response = live.get(location.removeprefix(live.url), stranger)
    assert response.status_code == 404
    assert error_of(response)["code"] == "job_not_found"


def test_job_status_needs_a_key(live, key):
    location = live.post("/api/jobs/", key, json={"text": "x", "model": "echo"}).headers["Location"]
    assert live.get(location.removeprefix(live.url)).status_code == 401
