"""`/healthz` and `/readyz`: no key, JSON, nothing secret; readiness follows the
workers, and a model that failed to load is reported with its reason and answered
503 `model_unavailable` without being loaded again on every call."""

from __future__ import annotations

import os
import signal

import pytest

from llmjobs import events
from llmjobs.models import Job
from tests.conftest import logs_dir
from tests.helpers import error_of, key_row, wait_until
from tests.llmjobs.test_worker_lost import child_pids

pytestmark = pytest.mark.django_db(transaction=True)


def test_healthz_answers_without_a_key(api):
    reply = api.get("/healthz")
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}
    assert api.post("/healthz", json={}).status_code == 405
    assert error_of(api.post("/readyz", json={}))["code"] == "method_not_allowed"


def test_readyz_says_which_part_is_missing_and_nothing_secret(api):
    reply = api.get("/readyz")
    body = reply.json()
    assert body["checks"] == {"database": True, "redis": True}
    # No worker runs in-process: every deployment is reported unserved, so not ready.
    assert reply.status_code == 503 and body["status"] == "not_ready"
    assert body["deployments"]["orphan"] == {"device": "cuda:7", "worker": False, "model": "unknown"}
    text = reply.content.decode()
    assert "redis://" not in text and "postgres://" not in text and "secret" not in text.lower()


def test_readyz_follows_a_worker_that_dies_and_comes_back(live):
    def sleeper_state() -> dict:
        return live.get("/readyz").json()["deployments"]["sleeper"]

    assert sleeper_state() == {"device": "cpu:3", "worker": True, "model": "loaded"}
    (worker_process,) = child_pids(live.workers["cpu:3"].pid)
    os.kill(worker_process, signal.SIGKILL)
    wait_until(lambda: not sleeper_state()["worker"], 20, "readyz to see the worker gone")
    wait_until(lambda: sleeper_state()["worker"], 60, "readyz to see the worker back")
    assert sleeper_state()["model"] == "loaded"


def test_a_model_that_failed_to_load_is_reported_and_answered_503(live, key):
    state = live.get("/readyz").json()["deployments"]["missing-model"]
    assert state["worker"] is True and state["model"] == "failed"
    assert "no model directory" in state["error"]

    for _ in range(2):
        reply = live.post("/v1/completions", key, json={"model": "missing-model", "prompt": "hi"})
        assert reply.status_code == 503
        error = error_of(reply)
        assert error["code"] == "model_unavailable" and "no model directory" in error["message"]
        assert reply.headers["Retry-After"] == "60"
    assert key_row(key).calls_used == 0  # refunded
    assert {job.error_code for job in Job.objects.filter(model="missing-model")} == {"model_unavailable"}
    # Loaded once, at the worker's start, not again for each call.
    log = (logs_dir() / "worker-cpu-1.log").read_text()
    since_start = log.rsplit("worker for cpu:1", 1)[-1]
    assert since_start.count("loading missing-model failed") == 1
    assert events.worker_alive("cpu:1")
