"""The device worker process: its memoized Algorithm per deployment, its one device
loop, and the task threads' side of a job.

Runs only inside a device worker process (`manage.py runworker <device>`), the one
process allowed to touch that device. Celery's task threads receive jobs and wait;
the device loop (`llmjobs.device`) runs them; what an ending does to a job's row and
its key is `llmjobs.lifecycle`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from algorithms.capabilities import Capabilities, capabilities_of
from algorithms.loader import build_algorithm
from djangollmapi import metrics
from djangollmapi.celery import consuming
from llmjobs import events, lifecycle, sending
from llmjobs.device import DeviceLoop, Watchdog
from llmjobs.engine import JOB_FAILED_MESSAGE, Ticket
from llmjobs.jobkinds import ModelUnavailable
from llmjobs.models import Job
from llmjobs.routing import device_queue_name, local_node, worker_name

log = logging.getLogger(__name__)

WORKER_LOST_MESSAGE = "The worker running this job died; the job was not completed."
DEVICE_ENV = "DLA_WORKER_DEVICE"

_loop: DeviceLoop | None = None
_loop_lock = threading.Lock()


_loaded: dict[str, Capabilities] = {}
_load_failures: dict[str, tuple[float, str]] = {}  # name -> (when, reason)
_load_lock = threading.Lock()


def get_algorithm(name: str) -> Capabilities:
    """Build a deployment's Algorithm once per process (it keeps its model resident)
    and find what it can do. A load that fails is remembered with its reason and not
    tried again for `MODEL_RELOAD_AFTER_S`: its jobs fail at once with
    `model_unavailable` meanwhile, and a fixed model (say, after `preparemodels`) loads
    on the next try without a restart."""
    with _load_lock:
        if name in _loaded:
            return _loaded[name]
        failure = _load_failures.get(name)
        if failure is not None and time.monotonic() - failure[0] < sending.MODEL_RELOAD_AFTER_S:
            raise ModelUnavailable(failure[1])
        deployment = settings.LLM_CONFIG.deployment(name)
        if deployment is None:
            raise LookupError(f"no deployment named {name!r}")
        device = worker_device() or deployment.devices[0]  # a replica loads on its worker's own device
        log.info("loading %s (%s) on %s", name, deployment.algorithm, device)
        try:
            algorithm = capabilities_of(build_algorithm(deployment.algorithm, device, deployment.options))
        except Exception as exc:
            reason = load_failure_reason(exc)
            _load_failures[name] = (time.monotonic(), reason)
            log.exception("loading %s failed: %s", name, reason)
            raise ModelUnavailable(reason) from exc
        _load_failures.pop(name, None)
        _loaded[name] = algorithm
        return algorithm


def load_failure_reason(exc: BaseException) -> str:
    """What an operator (and the 503's client) needs: the root error's type and first
    line (the loader wraps the constructor's error; its cause says what is wrong)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    first_line = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def model_states(device: str) -> dict[str, dict[str, Any]]:
    """Each deployment of the device: `loaded`, `failed` (with the reason) or `not_loaded`."""
    states = {}
    for deployment in settings.LLM_CONFIG.deployments_on(device):
        if deployment.name in _loaded:
            states[deployment.name] = {"state": "loaded"}
        elif deployment.name in _load_failures:
            states[deployment.name] = {"state": "failed", "error": _load_failures[deployment.name][1]}
        else:
            states[deployment.name] = {"state": "not_loaded"}
    return states


def configured_max_batch(name: str) -> int | None:
    deployment = settings.LLM_CONFIG.deployment(name)
    return deployment.max_batch if deployment is not None else None


def start_device(device: str, preload: bool) -> DeviceLoop:
    """Start this process's device loop and its watchdog: load the models first (when
    `preload`), then announce the queue as served."""
    global _loop
    with _loop_lock:
        if _loop is None:
            worker = this_worker(device)
            _loop = DeviceLoop(device, get_algorithm, configured_max_batch, lambda: model_states(device), worker)

            def before() -> None:
                if preload:
                    preload_algorithms(device)
                _loop.publish_state()  # the load states are known before the queue is served
                start_heartbeat(device, worker)

            _loop.start(before)
            Watchdog(_loop).start()
    return _loop


def device_loop() -> DeviceLoop:
    """The running loop; started on first use where no `runworker` started it."""
    if _loop is not None:
        return _loop
    device = worker_device() or "cpu"
    return start_device(device, preload=False)


def execute_job(
    job_id: str,
    model: str,
    kind: str,
    payload: Any,
    worker: str,
    key: int | None = None,
    weight: int = 1,
    sent: float | None = None,
    limits: tuple[float, float] | None = None,
) -> None:
    """The task thread's part: hand the job to the device loop, wait for its ending,
    and record it. The job's message stays unacknowledged until then."""
    close_old_connections()  # a connection broken since the last job is replaced, not reused
    # A job cancelled while it waited is skipped where the device loop admits it
    # (`DeviceLoop.admit`), one Redis round trip a job.
    soft, hard = limits or settings.LLM_CONFIG.job_time_limits(settings.LLM_CONFIG.deployment(model))
    ticket = Ticket(job_id, model, kind, payload, worker, key, weight, sent, soft, hard)
    loop = device_loop()
    if not loop.submit(ticket):
        log.info("job %s skipped: this worker holds it already (a redelivered message)", job_id)
        return
    try:
        ticket.ended.wait()
        record_ending(ticket)
    finally:
        loop.release(ticket)
        # Each held job has its own task thread: none may keep a pooled PostgreSQL
        # connection while it idles, or `max_held` threads would drain the pool.
        lifecycle.release_db_connection()


def record_ending(ticket: Ticket) -> None:
    """Write what the device loop made of the job; an outcome that cannot be recorded
    (not JSON) fails the job instead, so none is left running."""
    ended = time.monotonic()
    if ticket.outcome is not None:
        try:
            lifecycle.complete(ticket.job_id, ticket.outcome)
        except Exception:
            log.exception("job %s on %s: its outcome cannot be recorded", ticket.job_id, ticket.model)
            lifecycle.fail_in_worker(ticket.job_id, "job_failed", JOB_FAILED_MESSAGE, device=ticket.device_use())
    elif ticket.failure is not None:
        code, message = ticket.failure
        lifecycle.fail_in_worker(ticket.job_id, code, message, device=ticket.device_use())
    elif ticket.abandoned:
        fail_abandoned_job(ticket.job_id, ticket.worker)
    if ticket.started is not None:  # after the follower has its answer: off its path
        metrics.RUN_SECONDS.labels(ticket.model).observe(ended - ticket.started)
        metrics.DEVICE_SECONDS.labels(ticket.model).inc(ticket.device_s)


def fail_abandoned_job(job_id: str, worker: str) -> None:
    """A job already marked running that reaches a worker again was redelivered because
    the process running it died (killed, out of memory, a CUDA crash). Running it again
    could kill the next process too, so it fails, refunded, and its client is told.
    Unless another live worker of its queue runs it: a message two workers took (one
    restored for a dead worker while a live one had just taken it) runs once, there."""
    running_on = Job.objects.filter(id=job_id, status=Job.Status.RUNNING).values_list("worker", "queue").first()
    if running_on is not None and running_on[0] != worker:
        running_worker, queue = running_on
        if any(w.name == running_worker for w in events.queue_state(queue).workers):
            log.info("job %s skipped: %s, alive, runs it", job_id, running_worker)
            return
    if lifecycle.fail_in_worker(job_id, "worker_lost", WORKER_LOST_MESSAGE, only_status=Job.Status.RUNNING):
        log.error("job %s was abandoned by a dead worker process; marked failed", job_id)
    else:
        log.info("job %s skipped: no longer queued", job_id)


def worker_device() -> str | None:
    return os.environ.get(DEVICE_ENV)


def this_worker(device: str) -> str:
    """This host's worker of `device`: its Celery node name and its name in Redis."""
    return worker_name(device_queue_name(device), local_node())


def preload_algorithms(device: str) -> None:
    """Load every deployment of this device at start, so no client pays the load time."""
    for deployment in settings.LLM_CONFIG.deployments_on(device):
        try:
            get_algorithm(deployment.name)
        except ModelUnavailable:
            pass  # logged with its reason; its calls get 503 model_unavailable
        except Exception:
            log.exception("preloading %s failed", deployment.name)


def start_heartbeat(device: str, worker: str) -> threading.Thread:
    """Tell the web tier this device's queue has a live worker, `worker`: its field in
    the queue's heartbeat hash, good for three intervals, refreshed from a daemon thread
    while Celery consumes the queue (not before it has, nor while it reconnects to a
    restarted Redis). No live worker on any host → requests fail fast
    with 503."""
    queue = device_queue_name(device)
    interval = settings.LLM_CONFIG.worker.heartbeat_s
    stop = threading.Event()

    def beat_forever() -> None:
        beating = False
        while not stop.is_set():
            try:
                if consuming.is_set():
                    events.beat(queue, ttl_s=interval * 3, worker=worker)
                    beating = True
                elif beating:  # it stopped consuming (a warm shutdown, a lost broker): no new jobs
                    events.clear_heartbeat(queue, worker)
                    beating = False
            except Exception:
                log.warning("heartbeat to Redis failed; retrying")
            stop.wait(interval)

    thread = threading.Thread(target=beat_forever, name="dla-heartbeat", daemon=True)
    thread.start()
    return thread
