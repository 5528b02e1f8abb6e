"""Worker side: the memoized Algorithm per deployment, and running one job.

Runs only inside a device worker process (`manage.py runworker <device>`), the one
process allowed to touch that device.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import close_old_connections

from algorithms.loader import build_algorithm
from llmjobs import events, services
from llmjobs.routing import deployments_on_device, device_queue_name

log = logging.getLogger(__name__)

JOB_FAILED_MESSAGE = "The model failed to process the request."
TIME_LIMIT_MESSAGE = "The job ran past its time limit and was stopped."
WORKER_LOST_MESSAGE = "The worker running this job died; the job was not completed."
DEVICE_ENV = "DLA_WORKER_DEVICE"
PRELOAD_ENV = "DLA_WORKER_PRELOAD"


@functools.cache
def get_algorithm(name: str) -> Any:
    """Build a deployment's Algorithm once per process; it keeps its model resident."""
    deployment = settings.LLM_CONFIG.deployment(name)
    if deployment is None:
        raise LookupError(f"no deployment named {name!r}")
    log.info("loading %s (%s) on %s", name, deployment.algorithm, deployment.device)
    return build_algorithm(deployment.algorithm, deployment.device, deployment.options)


def execute_job(job_id: str, model: str, kind: str, payload: Any, worker: str) -> None:
    """Run one job: skip it if cancelled, claim it, run, record, publish. Recording
    first means a client that has its answer finds the job row and refund already done;
    anything failing up to the publish fails the job, so none is left running."""
    close_old_connections()  # a connection broken since the last job is replaced, not reused
    if events.is_cancelled(job_id):
        log.info("job %s skipped: cancelled", job_id)
        return
    if not services.mark_running(job_id, worker):
        fail_abandoned_job(job_id)
        return
    try:
        output = run_algorithm(get_algorithm(model), kind, payload)
        json.dumps(output)  # it travels and is stored as JSON: refuse anything else here
        services.finish_job(job_id, output)
        events.emit(job_id, "done", output=output)
    except SoftTimeLimitExceeded:
        log.warning("job %s on %s stopped at its time limit", job_id, model)
        fail_and_notify(job_id, "job_time_limit", TIME_LIMIT_MESSAGE)
    except Exception:
        log.exception("job %s on %s failed", job_id, model)
        fail_and_notify(job_id, "job_failed", JOB_FAILED_MESSAGE)


def fail_abandoned_job(job_id: str) -> None:
    """A job already marked running that reaches a worker again was redelivered because
    the process running it died (killed, out of memory, a CUDA crash). Running it again
    could kill the next process too, so it fails, refunded, and its client is told."""
    if fail_and_notify(job_id, "worker_lost", WORKER_LOST_MESSAGE, only_running=True):
        log.error("job %s was abandoned by a dead worker process; marked failed", job_id)
    else:
        log.info("job %s skipped: no longer queued", job_id)


def fail_and_notify(job_id: str, code: str, message: str, only_running: bool = False) -> bool:
    """Record the failure (refunded) and tell a waiting client; nothing when the job
    had already ended, e.g. its waiting request timed it out first."""
    failed = services.fail_job(job_id, code, message, only_running=only_running)
    if failed:
        events.emit(job_id, "error", code=code, message=message)
    return failed


def run_algorithm(algorithm: Any, kind: str, payload: Any) -> Any:
    if kind == "run":
        return algorithm.run(payload)
    raise ValueError(f"unknown job kind {kind!r}")


def worker_device() -> str | None:
    return os.environ.get(DEVICE_ENV)


def preload_algorithms(device: str) -> None:
    """Load every deployment of this device at start, so no client pays the load time."""
    for deployment in deployments_on_device(device):
        try:
            get_algorithm(deployment.name)
        except Exception:
            log.exception("preloading %s failed; its jobs will fail until fixed", deployment.name)


def start_heartbeat(device: str) -> threading.Thread:
    """Tell the web tier this device's queue has a live worker: a key with a short TTL,
    refreshed from a daemon thread. No key → requests fail fast with 503."""
    queue = device_queue_name(device)
    interval = settings.LLM_CONFIG.worker.heartbeat_s
    stop = threading.Event()

    def beat_forever() -> None:
        while not stop.is_set():
            try:
                events.beat(queue, ttl_s=interval * 3)
            except Exception:
                log.warning("heartbeat to Redis failed; retrying")
            stop.wait(interval)

    thread = threading.Thread(target=beat_forever, name="dla-heartbeat", daemon=True)
    thread.start()
    return thread
