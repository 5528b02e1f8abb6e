"""Celery entry points, thin: the work is in llmjobs.runtime."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import shared_task
from celery.signals import task_failure, worker_process_init, worker_process_shutdown

from llmjobs import events, lifecycle, runtime
from llmjobs.routing import device_queue_name


@shared_task(name="llmjobs.run_job", bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(self, job_id: str, model: str, kind: str, payload: Any) -> None:
    runtime.execute_job(job_id, model, kind, payload, worker=self.request.hostname or "")


@worker_process_init.connect
def on_worker_process_init(**kwargs) -> None:
    """In the pool process that runs the jobs (never the forking parent, which must not
    touch CUDA): load models, then announce the queue as served."""
    device = runtime.worker_device()
    if not device:
        return
    if os.environ.get(runtime.PRELOAD_ENV) == "1":
        runtime.preload_algorithms(device)
    runtime.start_heartbeat(device)


@worker_process_shutdown.connect
def on_worker_process_shutdown(**kwargs) -> None:
    device = runtime.worker_device()
    if device:
        with contextlib.suppress(Exception):
            events.clear_heartbeat(device_queue_name(device))


@task_failure.connect
def on_task_failure(sender=None, task_id=None, exception=None, **kwargs) -> None:
    """In the worker's parent: the child running a job overran the hard time limit or
    died. The job cannot record that itself, so the lifecycle fails and refunds it here."""
    if task_id is None or sender is None or sender.name != run_job.name:
        return
    if isinstance(exception, TimeLimitExceeded):
        lifecycle.fail_in_worker(task_id, "job_time_limit", runtime.TIME_LIMIT_MESSAGE)
    elif isinstance(exception, WorkerLostError):
        lifecycle.fail_in_worker(task_id, "worker_lost", runtime.WORKER_LOST_MESSAGE)
