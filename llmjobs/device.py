"""The one thread that touches a device, and what it runs next.

A device's worker process holds up to `[worker] max_held` jobs at once (Celery's
prefetch, each job waiting in a task thread, its message unacknowledged until it
ends). Every job is handed to this loop as a `Ticket`; the loop alone runs the
models, one step at a time:

- each deployment has an `Engine`: its waiting jobs in fair order across keys
  (`llmjobs.fairness`), and up to `max_batch` of them in flight;
- generation on a model with `start_batch` is continuously batched: a job joins at
  the next step boundary and leaves the moment it ends, is cancelled or times out;
- embeddings and `/api/` jobs on a plug-in with `run_batch` are grouped per call;
- everything else runs one job per step, as the seed did;
- the engines of one device take turns, a step each, so none starves another.

Each job is charged its share of every step it was in (`DeviceUse`). A `Watchdog`
stops a single-job step at its soft limit and takes the process down when a step
hangs past its hard limit; `runworker`'s supervisor then fails what the process held
and starts a new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.db import close_old_connections
from django.utils import timezone

from algorithms.base import GenerationRequest, GenerationSession
from algorithms.capabilities import Capabilities
from djangollmapi import metrics
from llmjobs import events, lifecycle
from llmjobs.fairness import FairQueue
from llmjobs.jobkinds import (
    MemberEmit,
    ModelUnavailable,
    StepPublisher,
    UnsupportedOperation,
    generation_outcome,
    run_embeddings_batch,
    run_job_kind,
    run_text_batch,
)
from llmjobs.lifecycle import DeviceUse, Outcome
from llmjobs.models import Job
from llmjobs.routing import device_queue_name

log = logging.getLogger(__name__)

JOB_FAILED_MESSAGE = "The model failed to process the request."
TIME_LIMIT_MESSAGE = "The job ran past its time limit and was stopped."
GENERATION = (Job.Kind.CHAT, Job.Kind.COMPLETION)
HUNG_STEP_EXIT_STATUS = 70
STATE_EVERY_S = 0.25  # how often the loop publishes what it holds
STATE_TTL_S = 5.0


@dataclass(eq=False)
class Ticket:
    """One job held by the device's worker: what to run, and how it ended. The task
    thread that received it waits on `ended` and records the ending."""

    job_id: str
    model: str
    kind: str
    payload: Any
    worker: str
    key: int | None = None
    weight: int = 1
    sent: float | None = None  # when the job was created: its place among its key's jobs
    soft_limit_s: float = 600.0
    hard_limit_s: float = 605.0
    started: float | None = None  # monotonic, once admitted to a slot
    device_s: float = 0.0
    batch_size: int = 0
    ended_at: datetime | None = None
    outcome: Outcome | None = None
    failure: tuple[str, str] | None = None  # (code, message)
    abandoned: bool = False  # not claimable: already running (a dead worker's) or ended
    skipped: bool = False  # cancelled before it started
    queued: bool = False  # in its deployment's fair queue (else still arriving)
    ended: threading.Event = field(default_factory=threading.Event)

    def device_use(self) -> DeviceUse | None:
        if not self.batch_size:
            return None
        return DeviceUse(self.device_s, self.batch_size, self.ended_at or timezone.now())

    def succeed(self, outcome: Outcome) -> None:
        self.ended_at = timezone.now()
        self.outcome = dataclasses.replace(outcome, device=self.device_use())
        self.ended.set()

    def fail(self, code: str, message: str) -> None:
        self.ended_at = timezone.now()
        self.failure = (code, message)
        self.ended.set()

    def past_soft_limit(self, now: float) -> bool:
        return self.started is not None and now - self.started > self.soft_limit_s

    def hard_deadline(self) -> float:
        return (self.started or time.monotonic()) + self.hard_limit_s


@dataclass
class Step:
    """What the device is running now, for the watchdog."""

    tickets: list[Ticket]
    began: float
    interruptible: bool  # one job's own code: its soft limit may interrupt it
    interrupted: bool = False


class GuardedQueue:
    """A deployment's fair queue, which the watchdog thread reads (to publish what
    waits) while the device loop changes it: every operation under the loop's lock."""

    def __init__(self, lock: threading.RLock) -> None:
        self._queue: FairQueue[Ticket] = FairQueue()
        self._lock = lock

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    def push(self, job_id: str, key: Any, ticket: Ticket, weight: float, order: float | None) -> None:
        with self._lock:
            self._queue.push(job_id, key, ticket, weight, order)

    def pop(self) -> Ticket | None:
        with self._lock:
            return self._queue.pop()

    def peek(self) -> Ticket | None:
        with self._lock:
            return self._queue.peek()

    def items(self) -> list[Ticket]:
        with self._lock:
            return self._queue.items()


class Engine:
    """One deployment on the device: its fair queue and the jobs it has in flight."""

    def __init__(self, loop: DeviceLoop, name: str, algorithm: Capabilities, max_batch: int) -> None:
        self.loop, self.name, self.algorithm, self.max_batch = loop, name, algorithm, max_batch
        self.waiting = GuardedQueue(loop.lock)
        self.session: GenerationSession | None = None
        self.decoding: dict[int, Ticket] = {}
        self.publishers: dict[int, MemberEmit] = {}
        self.step_publisher = StepPublisher()
        self.job_s: float | None = None  # recent run time of a job, admission to end (EWMA)
        self._running: set[Ticket] = set()

    def has_work(self) -> bool:
        return bool(len(self.waiting) or self.decoding)

    def queue(self, ticket: Ticket) -> None:
        self.waiting.push(ticket.job_id, ticket.key, ticket, ticket.weight, ticket.sent)
        ticket.queued = True

    def step(self) -> None:
        """One unit of device work: joiners enter the batch, then either a group of
        other jobs runs or the batch decodes one token; then deadlines are enforced."""
        self._admit_joiners()
        head = self.waiting.peek()
        if head is not None and not self._joins_batch(head):
            group = self._take_group()
            if group:
                self._run_group(group)
        elif self.decoding:
            self._decode_step()
        self._enforce_deadlines()
        self._measure_ended()

    def state(self) -> dict:
        """What the web tier shows a waiting client: its place, and the pace of slots."""
        return {
            "waiting": [ticket.job_id for ticket in self.waiting.items()],
            "running": len(self.decoding),
            "max_batch": self.max_batch,
            "job_s": self.job_s,
        }

    def _measure_ended(self) -> None:
        self._running |= set(self.decoding.values())
        for ticket in [t for t in self._running if t.ended.is_set()]:
            self._running.discard(ticket)
            if ticket.started is not None and ticket.failure is None:
                took = time.monotonic() - ticket.started
                self.job_s = took if self.job_s is None else 0.8 * self.job_s + 0.2 * took

    # --- continuous batching ----------------------------------------------------

    def _joins_batch(self, ticket: Ticket) -> bool:
        return ticket.kind in GENERATION and self.max_batch > 1 and self.algorithm.start_batch is not None

    def _admit_joiners(self) -> None:
        """Every waiting generation job there is a slot for joins now, prefilled together."""
        joiners = []
        while len(self.decoding) + len(joiners) < self.max_batch:
            head = self.waiting.peek()
            if head is None or not self._joins_batch(head):
                break
            self.waiting.pop()
            if self.loop.admit(head):
                joiners.append(head)
        if joiners:
            self._join(joiners)

    def _join(self, tickets: list[Ticket]) -> None:
        if self.session is None:
            self.session = self.algorithm.start_batch()
        publishers = [self.step_publisher.emit_for(t.job_id, bool(t.payload.get("stream"))) for t in tickets]
        joiners = [
            (GenerationRequest.from_payload(t.payload["request"]), publisher)
            for t, publisher in zip(tickets, publishers, strict=True)
        ]
        try:
            joined = self.loop.timed(tickets, lambda: self.session.add(joiners))
        except Exception:
            log.exception("jobs %s on %s failed to join their batch", [t.job_id for t in tickets], self.name)
            _fail_all(tickets, "job_failed", JOB_FAILED_MESSAGE)
            self._forget(tickets)
            return
        for ticket, publisher, (handle, _completion) in zip(tickets, publishers, joined, strict=True):
            self.decoding[handle] = ticket
            self.publishers[handle] = publisher
        self._publish_step()
        for handle, completion in joined:
            if completion is not None:
                self._end_member(handle, completion)

    def _decode_step(self) -> None:
        members = list(self.decoding.values())
        try:
            ended = self.loop.timed(members, self.session.step)
        except Exception:
            log.exception("a decode step of %s failed; its %d jobs fail", self.name, len(members))
            _fail_all(members, "job_failed", JOB_FAILED_MESSAGE)
            self._forget(members)
            self.decoding.clear()
            self.publishers.clear()
            self.session = None
            return
        self._publish_step()
        for handle, completion in ended:
            self._end_member(handle, completion)

    def _publish_step(self) -> None:
        """The step's tokens to their streams, and who was cancelled, in one round trip
        (a Redis failure here ends the loop's iteration; the members stay and retry)."""
        self.step_publisher.flush()

    def _end_member(self, handle: int, completion: Any) -> None:
        publisher = self.publishers.pop(handle)
        self.step_publisher.forget(publisher.job_id)
        self._leave(handle).succeed(generation_outcome(completion, publisher.cancelled))

    def _forget(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            self.step_publisher.forget(ticket.job_id)

    def _leave(self, handle: int) -> Ticket:
        return self.decoding.pop(handle)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for handle, ticket in list(self.decoding.items()):
            if ticket.past_soft_limit(now):
                self.session.remove(handle)
                self._forget([ticket])
                self.publishers.pop(handle, None)
                log.warning("job %s on %s stopped at its time limit", ticket.job_id, self.name)
                self._leave(handle).fail("job_time_limit", TIME_LIMIT_MESSAGE)

    # --- grouped and single jobs ---------------------------------------------------

    def _take_group(self) -> list[Ticket]:
        """The head job, and as many following ones of its kind as one call can take."""
        first = self.waiting.pop()
        group = [first] if self.loop.admit(first) else []
        if not self._groups(first.kind):
            return group
        inputs = sum(_inputs_of(t) for t in group)
        while (head := self.waiting.peek()) is not None and head.kind == first.kind:
            if inputs + _inputs_of(head) > self.max_batch:
                break
            self.waiting.pop()
            if self.loop.admit(head):
                group.append(head)
                inputs += _inputs_of(head)
        return group

    def _groups(self, kind: str) -> bool:
        if self.max_batch <= 1:
            return False
        if kind == Job.Kind.EMBEDDINGS:
            return self.algorithm.embed is not None
        return kind == Job.Kind.RUN and self.algorithm.run_batch is not None

    def _run_group(self, group: list[Ticket]) -> None:
        if len(group) == 1 and not self._groups(group[0].kind):
            ticket = group[0]
            self._settle(group, lambda: [run_job_kind(self.algorithm, ticket.job_id, ticket.kind, ticket.payload)])
        elif group[0].kind == Job.Kind.EMBEDDINGS:
            self._settle(group, lambda: run_embeddings_batch(self.algorithm, [t.payload for t in group]))
        else:
            self._settle(group, lambda: run_text_batch(self.algorithm, [t.payload for t in group]))

    def _settle(self, group: list[Ticket], run: Callable[[], list[Outcome]]) -> None:
        self._running |= set(group)
        try:
            outcomes = self.loop.timed(group, run, interruptible=len(group) == 1)
        except SoftTimeLimitExceeded:
            log.warning("job %s on %s stopped at its time limit", group[0].job_id, self.name)
            _fail_all(group, "job_time_limit", TIME_LIMIT_MESSAGE)
        except UnsupportedOperation as exc:
            _fail_all(group, "unsupported_operation", str(exc))
        except Exception:
            log.exception("jobs %s on %s failed", [t.job_id for t in group], self.name)
            _fail_all(group, "job_failed", JOB_FAILED_MESSAGE)
        else:
            for ticket, outcome in zip(group, outcomes, strict=True):
                ticket.succeed(outcome)


def _inputs_of(ticket: Ticket) -> int:
    return len(ticket.payload["input"]) if ticket.kind == Job.Kind.EMBEDDINGS else 1


def _fail_all(group: list[Ticket], code: str, message: str) -> None:
    for ticket in group:
        ticket.fail(code, message)


class DeviceLoop:
    """The device's one thread of model work, fed by the task threads."""

    def __init__(
        self,
        device: str,
        build: Callable[[str], Capabilities],
        max_batch_of: Callable[[str], int | None],
        models: Callable[[], dict[str, dict[str, Any]]] = dict,
    ) -> None:
        self.device = device
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
        busy = [engine for engine in self.engines.values() if engine.has_work()]
        self._take_arrivals(wait=block and not busy)
        for engine in [engine for engine in self.engines.values() if engine.has_work()]:
            engine.step()

    def publish_state(self) -> None:
        """Tell the web tier what waits here (positions, ETAs, the queue's depth): each
        deployment's queue in the order it will run, then the jobs still arriving (a
        long step delays their queuing, not their place in this list). Runs in the
        watchdog's thread, so it is current while a step runs."""
        with self.lock:
            deployments = {name: engine.state() for name, engine in list(self.engines.items())}
        with self._held_lock:
            arriving = sorted((t for t in self._held.values() if not t.queued), key=lambda t: t.sent or 0.0)
        for ticket in arriving:
            entry = deployments.setdefault(
                ticket.model,
                {"waiting": [], "running": 0, "max_batch": self.max_batch_of(ticket.model) or 1, "job_s": None},
            )
            entry["waiting"].append(ticket.job_id)
        state = {
            "waiting": sum(len(d["waiting"]) for d in deployments.values()),
            "deployments": deployments,
            "models": self.models(),
        }
        try:
            events.publish_device_state(device_queue_name(self.device), state, ttl_s=STATE_TTL_S)
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
            ticket.skipped = True
            ticket.ended.set()
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
            share = (time.monotonic() - step.began) / len(tickets)
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
            events.clear_heartbeat(device_queue_name(self.loop.device))  # no new work until replaced
        for ticket in step.tickets:
            with contextlib.suppress(Exception):
                lifecycle.fail_in_worker(ticket.job_id, "job_time_limit", TIME_LIMIT_MESSAGE)
        os._exit(HUNG_STEP_EXIT_STATUS)
