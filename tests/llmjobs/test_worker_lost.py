"""A job whose worker process dies is failed and refunded, never left `running`, and
the device goes on serving."""

import os
import signal
import time
from pathlib import Path

import pytest

from llmjobs import events
from llmjobs.models import Job
from tests.helpers import key_row, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def child_pids(parent: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                pids.append(int(entry.name))
    return pids


def test_killed_worker_process_fails_and_refunds_its_job(live, key):
    response = live.post("/api/jobs/", key, json={"text": "x", "model": "long-job"})
    job_id = response.json()["job_id"]
    wait_until(lambda: Job.objects.filter(id=job_id, status=Job.Status.RUNNING).exists())
    (pool_process,) = child_pids(live.workers["cpu:3"].pid)

    os.kill(pool_process, signal.SIGKILL)

    job = wait_until(lambda: Job.objects.filter(id=job_id, status=Job.Status.FAILED).first())
    assert job.error_code == "worker_lost" and job.refunded
    assert key_row(key).calls_used == 0
    status = live.get(f"/api/jobs/{job_id}/", key).json()
    assert status["error"]["code"] == "worker_lost"
    # The supervisor started a new worker process; once it is up, the device serves the next job.
    wait_until(lambda: events.worker_alive("cpu:3"), 60, "the restarted worker")
    again = live.post("/api/jobs/", key, json={"text": "y", "model": "long-job"}).json()["job_id"]
    finished = wait_until(lambda: Job.objects.filter(id=again, status=Job.Status.SUCCEEDED).first())
    assert finished.output == "y"


def test_job_past_its_soft_time_limit_is_stopped_and_refunded(live, key):
    started = time.monotonic()
    job_id = live.post("/api/jobs/", key, json={"text": "x", "model": "sleeper"}).json()["job_id"]
    job = wait_until(lambda: Job.objects.filter(id=job_id, status=Job.Status.FAILED).first())
    assert time.monotonic() - started < 2.4  # sleeper would run 2.5 s; its limit is 1 s
    assert (job.error_code, job.refunded) == ("job_time_limit", True)
    assert key_row(key).calls_used == 0


def test_job_ignoring_its_soft_limit_is_killed_at_the_hard_limit(live, key):
    job_id = live.post("/api/jobs/", key, json={"text": "x", "model": "stubborn"}).json()["job_id"]
    wait_until(lambda: Job.objects.filter(id=job_id, status=Job.Status.RUNNING).exists())
    (hung,) = child_pids(live.workers["cpu:3"].pid)
    job = wait_until(lambda: Job.objects.filter(id=job_id, status=Job.Status.FAILED).first())
    assert (job.error_code, job.refunded) == ("job_time_limit", True)
    assert key_row(key).calls_used == 0
    # The process that hung is replaced and the device serves again. Until it has exited
    # its consumer may still take a message (redelivered only after the visibility
    # timeout); until the new one consumes, the hung one's last heartbeat may still look
    # alive, then none does: a job is refused 503 no_worker in that gap, never lost.
    wait_until(lambda: hung not in child_pids(live.workers["cpu:3"].pid), 30, "the hung process to exit")
    follow = wait_until(lambda: accepted_job(live, key, "long-job", "ok"), 60, "the restarted worker to take jobs")
    assert wait_until(lambda: Job.objects.filter(id=follow, status=Job.Status.SUCCEEDED).first()).output == "ok"
    again = live.post("/api/", key, json={"text": "z", "model": "sleeper"})
    assert again.status_code == 504  # sleeper itself still outlives its 1 s timeout


def accepted_job(live, key: str, model: str, text: str) -> str | None:
    """The job's id once the server takes it; None while it answers 503 no_worker."""
    reply = live.post("/api/jobs/", key, json={"text": text, "model": model})
    if reply.status_code == 503 and reply.json()["error"]["code"] == "no_worker":
        return None
    assert reply.status_code == 202, reply.text
    return reply.json()["job_id"]
