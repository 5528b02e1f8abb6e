"""A device queue past its depth answers 429 `queue_full` at once, refunded, with a
`Retry-After` from the job times its worker measured (not a fixed second)."""

from __future__ import annotations

import json

import pytest

from llmjobs import events
from llmjobs.models import Job
from llmjobs.routing import device_queue_name
from llmjobs.sending import queue_drain_s
from tests.helpers import error_of, key_row

pytestmark = pytest.mark.django_db(transaction=True)

ORPHAN_QUEUE = device_queue_name("cuda:7")  # configured, served by no worker of the suite


@pytest.fixture
def busy_device(redis_server):
    """What a busy worker of `orphan`'s device publishes, written as it writes it: a
    heartbeat, `waiting` jobs held, and its deployment's measured job time."""

    def publish(waiting: int, job_s: float | None, max_batch: int = 4) -> None:
        deployments = {"orphan": {"waiting": [], "running": max_batch, "max_batch": max_batch, "job_s": job_s}}
        events.beat(ORPHAN_QUEUE, ttl_s=30)
        events.publish_device_state(ORPHAN_QUEUE, waiting, {"orphan": {"state": "loaded"}}, deployments, ttl_s=30)

    yield publish
    events.clear_heartbeat(ORPHAN_QUEUE)
    redis_server.delete(ORPHAN_QUEUE)  # the message no worker will take


def test_a_full_queue_is_503_with_a_measured_retry_after(api, key, busy_device):
    busy_device(waiting=50 + 19, job_s=2.0)  # 20 over the depth of 50; 4 jobs end every 2 s
    reply = api.post("/api/", key, json={"text": "hi", "model": "orphan"})
    assert (reply.status_code, error_of(reply)["code"]) == (429, "queue_full")
    assert reply["Retry-After"] == "10"  # 20 jobs at 2 a second
    assert "retry in about 10 s" in error_of(reply)["message"]
    (job,) = Job.objects.all()
    assert (job.status, job.error_code, job.refunded) == (Job.Status.FAILED, "queue_full", True)
    assert key_row(key).calls_used == 0


def test_a_queue_below_its_depth_takes_the_job(api, key, busy_device):
    busy_device(waiting=49, job_s=2.0)
    reply = api.post("/api/jobs/", key, json={"text": "hi", "model": "orphan"})
    assert reply.status_code == 202
    assert json.loads(reply.content)["status"] == "queued"


@pytest.mark.parametrize(
    "deployments, excess, wait",
    [
        ({}, 5, 1),  # nothing measured yet
        ({"a": {"max_batch": 1, "job_s": None}}, 5, 1),
        ({"a": {"max_batch": 1, "job_s": 0.5}}, 5, 3),  # 2 a second: 2.5 s, rounded up
        ({"a": {"max_batch": 16, "job_s": 4.0}, "b": {"max_batch": 1, "job_s": 1.0}}, 50, 10),  # 5 a second
        ({"a": {"max_batch": 1, "job_s": 120.0}}, 100, 600),  # capped at 10 minutes
        ({"a": {"max_batch": 32, "job_s": 0.01}}, 1, 1),  # never under a second
    ],
)
def test_the_wait_follows_the_measured_drain_rate(deployments, excess, wait):
    assert queue_drain_s(deployments, excess) == wait
