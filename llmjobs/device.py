"""The one thread that touches a device, and the watchdog beside it.

A device's worker process holds up to `[worker] max_held` jobs at once (Celery's
prefetch, each job waiting in a task thread, its message unacknowledged until it
ends). Every job is handed to the `DeviceLoop` as a `Ticket`; the loop alone runs
the models, one step at a time: it claims each job for a slot, gives each
deployment's `Engine` (`llmjobs.engine`) a step in turn, so none starves another,
and charges each job its share of every step it was in (`DeviceUse`). A `Watchdog`
stops a single-job step at its soft limit, takes the process down when a step hangs
past its hard limit (`runworker`'s supervisor then fails what the process held and
starts a new one), and publishes what the loop holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.db import close_old_connections

from algorithms.capabilities import Capabilities
from djangollmapi import metrics
from llmjobs import events, lifecycle
from llmjobs.engine import JOB_FAILED_MESSAGE, TIME_LIMIT_MESSAGE, Engine, Ticket
from llmjobs.jobkinds import ModelUnavailable
from llmjobs.routing import device_queue_name

log = logging.getLogger(__name__)

HUNG_STEP_EXIT_STATUS = 70
STATE_EVERY_S = 0.25  # how often the loop publishes what it holds
STATE_TTL_S = 5.0


@dataclass
class Step:
    """What the device is running now, for the watchdog."""

    tickets: list[Ticket]
    began: float
    interruptible: bool  # one job's own code: its soft limit may interrupt it
    interrupted: bool = False


class DeviceLoop:
    """The device's one thread of model work, fed by the task threads."""

    def __init__(
        self,
        device: str,
        build: Callable[[str], Capabilities],
        max_batch_of: Callable[[str], int | None],
        models: Callable[[], dict[str, dict[str, Any]]] = dict,
        worker: str = "",
    ) -> None:
        self.device = device
        self.queue = device_queue_name(device)
        self.worker = worker or None  # None: this host's worker of the device
        self.build, self.max_batch_of, self.models = build, max_batch_of, models
        self.inbox: queue.SimpleQueue[Ticket] = queue.SimpleQueue()
        self.engines: dict[str, Engine] = {}
        self.current: Step | None = None
        self.thread: threading.Thread | None = None
        self.lock = threading.RLock()
        self._held: dict[str, Ticket] = {}
        self._held_lock = threading.Lock()

    def submit(self, ticket: Ticket) -> bool:
        """Hand a job to the loop; False (and nothing to record) when this process
        holds that job already: a message the broker redelivered while its job still
        waits here (held past the visibility timeout) must not run it twice."""
        with self._held_lock:
            if ticket.job_id in self._held:
                return False
            self._held[ticket.job_id] = ticket
        self.inbox.put(ticket)
        return True

    def release(self, ticket: Ticket) -> None:
        """The job's task thread has recorded its ending."""
        with self._held_lock:
            if self._held.get(ticket.job_id) is ticket:
                del self._held[ticket.job_id]

    def start(self, before: Callable[[], None] = lambda: None) -> threading.Thread:
        """Run the loop in a daemon thread, after `before` (loading the models)."""

        def main() -> None:
            before()
            self.run_forever()

        self.thread = threading.Thread(target=main, name=f"dla-device-{self.device}", daemon=True)
        self.thread.start()
        return self.thread

    def run_forever(self) -> None:
        while True:
            try:
                self.run_once(block=True)
            except Exception:  # the loop must outlive any one failure, or every job hangs
                log.exception("the device loop of %s hit an error; going on", self.device)
                time.sleep(0.1)

    def run_once(self, block: bool = False) -> None:
        """Take in what arrived, then give each engine with work one step."""
        self._take_arrivals(wait=block and not any(engine.has_work() for engine in self.engines.values()))
        for engine in [engine for engine in self.engines.values() if engine.has_work()]:
            engine.step()

    def publish_state(self) -> None:
        """Tell the web tier what waits here (positions, ETAs, the queue's depth): each
        deployment's queue in the order it will run, then the jobs still arriving (a
        long step delays their queuing, not their place in this list). And tell the
        reaper every job held here, so that it never ends one this process will. Runs
        in the watchdog's thread, so it is current while a step runs."""
        with self.lock:
            deployments = {name: engine.state() for name, engine in list(self.engines.items())}
        with self._held_lock:
            held = list(self._held)
            arriving = sorted((t for t in self._held.values() if not t.queued), key=lambda t: t.sent or 0.0)
        for ticket in arriving:
            entry = deployments.setdefault(
                ticket.model,
                {"waiting": [], "running": 0, "max_batch": self.max_batch_of(ticket.model) or 1, "job_s": None},
            )
            entry["waiting"].append(ticket.job_id)
        waiting = sum(len(d["waiting"]) for d in deployments.values())
        try:
            events.publish_device_state(
                self.queue, waiting, self.models(), deployments, ttl_s=STATE_TTL_S, held=held, worker=self.worker
            )
        except Exception:
            log.warning("publishing the device's state to Redis failed; retrying")

    def _take_arrivals(self, wait: bool) -> None:
        try:
            ticket = self.inbox.get(timeout=1.0) if wait else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._queue(ticket)
            try:
                ticket = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _queue(self, ticket: Ticket) -> None:
        engine = self.engines.get(ticket.model)
        if engine is None:
            try:
                engine = self._engine_for(ticket.model)
            except ModelUnavailable as exc:
                if self.admit(ticket):
                    ticket.fail("model_unavailable", f"The model {ticket.model!r} failed to load: {exc}")
                return
            except Exception:
                log.exception("setting up %s failed; its job %s fails", ticket.model, ticket.job_id)
                if self.admit(ticket):
                    ticket.fail("job_failed", JOB_FAILED_MESSAGE)
                return
        engine.queue(ticket)

    def _engine_for(self, name: str) -> Engine:
        algorithm = self.build(name)
        max_batch = self.max_batch_of(name) or algorithm.default_max_batch
        engine = self.engines[name] = Engine(self, name, algorithm, max_batch)
        log.info("%s on %s: up to %d jobs in flight", name, self.device, max_batch)
        return engine

    def admit(self, ticket: Ticket) -> bool:
        """Claim a job for a slot: skipped if its client cancelled it while it waited,
        abandoned if it cannot be claimed (a dead worker's, or ended meanwhile)."""
        try:
            close_old_connections()
            cancelled = events.is_cancelled(ticket.job_id)
            claimed = not cancelled and lifecycle.start(ticket.job_id, ticket.worker)
        except Exception:
            log.exception("job %s could not be claimed (database or Redis down?)", ticket.job_id)
            ticket.fail("job_failed", JOB_FAILED_MESSAGE)
            return False
        if cancelled:
            log.info("job %s skipped: cancelled", ticket.job_id)
            ticket.ended.set()  # nothing to record: its client ended it
            return False
        if not claimed:
            ticket.abandoned = True
            ticket.ended.set()
            return False
        ticket.started = time.monotonic()
        if ticket.sent is not None:
            metrics.QUEUE_SECONDS.labels(ticket.model).observe(max(0.0, time.time() - ticket.sent))
        return True

    def timed(self, tickets: list[Ticket], run: Callable[[], Any], interruptible: bool = False) -> Any:
        """Run one step for `tickets` and charge each its share of the time."""
        self.current = Step(tickets, time.monotonic(), interruptible)
        try:
            return run()
        finally:
            step, self.current = self.current, None
            took = time.monotonic() - step.began
            metrics.DEVICE_BUSY_SECONDS.labels(self.device).inc(took)
            share = took / len(tickets)
            for ticket in tickets:
                ticket.device_s += share
                ticket.batch_size = max(ticket.batch_size, len(tickets))


class Watchdog:
    """Also publishes the loop's state, being the thread that is never busy.

    Soft limit: interrupt a single job's step (an exception raised in the device
    thread, as Celery's soft limit would). Hard limit: a step still running when one
    of its jobs' hard limit passes cannot be stopped from Python, so its jobs fail
    and the process exits; the supervisor fails the rest it held and restarts it."""

    def __init__(self, loop: DeviceLoop, interval_s: float = 0.05) -> None:
        self.loop, self.interval_s = loop, interval_s

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.watch_forever, name="dla-watchdog", daemon=True)
        thread.start()
        return thread

    def watch_forever(self) -> None:
        published = 0.0
        while True:
            time.sleep(self.interval_s)
            step = self.loop.current
            if step is not None:
                self.check(step, time.monotonic())
            if time.monotonic() - published > STATE_EVERY_S:
                published = time.monotonic()
                self.loop.publish_state()

    def check(self, step: Step, now: float) -> None:
        if step.interruptible and not step.interrupted and step.tickets[0].past_soft_limit(now):
            step.interrupted = True
            self.interrupt_device_thread()
        if now > min(ticket.hard_deadline() for ticket in step.tickets):
            self.take_the_process_down(step)

    def interrupt_device_thread(self) -> None:
        thread = self.loop.thread
        if thread is not None and thread.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(thread.ident), ctypes.py_object(SoftTimeLimitExceeded)
            )

    def take_the_process_down(self, step: Step) -> None:
        log.error("a step of jobs %s hangs past its hard limit; exiting", [t.job_id for t in step.tickets])
        with contextlib.suppress(Exception):
            events.clear_heartbeat(self.loop.queue, self.loop.worker)  # no new work until replaced
        for ticket in step.tickets:
            with contextlib.suppress(Exception):
                lifecycle.fail_in_worker(ticket.job_id, "job_time_limit", TIME_LIMIT_MESSAGE)
        os._exit(HUNG_STEP_EXIT_STATUS)
