"""Celery entry points, thin: the work is in llmjobs.runtime."""

from __future__ import annotations

import contextlib
from typing import Any

from celery import shared_task
from celery.signals import worker_shutdown

from llmjobs import events, runtime
from llmjobs.routing import device_queue_name


@shared_task(name="llmjobs.run_job", bind=True, acks_late=True, ignore_result=True)
def run_job(
    self,
    job_id: str,
    model: str,
    kind: str,
    payload: Any,
    key: int | None = None,
    weight: int = 1,
    sent: float | None = None,
) -> None:
    """`key`, `weight` and `sent` (when the job was created) are for the device's fair
    admission; the time limits come in the message's own headers."""
    hard, soft = self.request.timelimit or (None, None)
    limits = (float(soft), float(hard)) if soft and hard else None
    runtime.execute_job(job_id, model, kind, payload, self.request.hostname or "", key, weight, sent, limits)


@worker_shutdown.connect
def on_worker_shutdown(**kwargs) -> None:
    """This worker stops serving its device (the device's workers on other hosts go on)."""
    device = runtime.worker_device()
    if device:
        with contextlib.suppress(Exception):
            events.clear_heartbeat(device_queue_name(device), runtime.this_worker(device))
