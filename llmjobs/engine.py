"""What one deployment on a device runs next: the jobs its worker holds (`Ticket`),
waiting in fair order across keys (`llmjobs.fairness`), and up to `max_batch` of them
in flight (`Engine`):

- generation on a model with `start_batch` is continuously batched: a job joins at
  the next step boundary and leaves the moment it ends, is cancelled or times out;
- embeddings and `/api/` jobs on a plug-in with `run_batch` are grouped per call;
- everything else runs one job per step, as the seed did.

Only the device loop (`llmjobs.device`) drives an engine, a step at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded
from django.utils import timezone

from algorithms.base import GenerationRequest, GenerationSession
from algorithms.capabilities import Capabilities
from llmjobs.fairness import FairQueue
from llmjobs.jobkinds import (
    MemberEmit,
    StepPublisher,
    UnsupportedOperation,
    generation_outcome,
    run_embeddings_batch,
    run_job_kind,
    run_text_batch,
)
from llmjobs.lifecycle import DeviceUse, Outcome
from llmjobs.models import Job

if TYPE_CHECKING:
    from llmjobs.device import DeviceLoop

log = logging.getLogger(__name__)

JOB_FAILED_MESSAGE = "The model failed to process the request."
TIME_LIMIT_MESSAGE = "The job ran past its time limit and was stopped."
GENERATION = (Job.Kind.CHAT, Job.Kind.COMPLETION)


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

    def state(self) -> dict:
        """What the web tier shows a waiting client: its place, and the pace of slots."""
        return {
            "waiting": [ticket.job_id for ticket in self.waiting.items()],
            "running": len(self.decoding),
            "max_batch": self.max_batch,
            "job_s": self.job_s,
        }

    def _succeed(self, ticket: Ticket, outcome: Outcome) -> None:
        """A job ends well: its run time feeds the recent job time (the ETAs)."""
        took = time.monotonic() - ticket.started
        self.job_s = took if self.job_s is None else 0.8 * self.job_s + 0.2 * took
        ticket.succeed(outcome)

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
        self.step_publisher.flush()  # the joiners' first pieces
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
        # The step's pieces to their streams and who was cancelled, in one round trip (a
        # Redis failure raises out of the loop's iteration: these pieces are lost).
        self.step_publisher.flush()
        for handle, completion in ended:
            self._end_member(handle, completion)

    def _end_member(self, handle: int, completion: Any) -> None:
        ticket, publisher = self._leave(handle)
        self._succeed(ticket, generation_outcome(completion, publisher.cancelled))

    def _leave(self, handle: int) -> tuple[Ticket, MemberEmit]:
        """A member out of the engine's books (the session has let it go already)."""
        publisher = self.publishers.pop(handle)
        self.step_publisher.forget(publisher.job_id)
        return self.decoding.pop(handle), publisher

    def _forget(self, tickets: list[Ticket]) -> None:
        for ticket in tickets:
            self.step_publisher.forget(ticket.job_id)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for handle, ticket in list(self.decoding.items()):
            if ticket.past_soft_limit(now):
                self.session.remove(handle)
                self._leave(handle)
                log.warning("job %s on %s stopped at its time limit", ticket.job_id, self.name)
                ticket.fail("job_time_limit", TIME_LIMIT_MESSAGE)

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
                self._succeed(ticket, outcome)


def _inputs_of(ticket: Ticket) -> int:
    return len(ticket.payload["input"]) if ticket.kind == Job.Kind.EMBEDDINGS else 1


def _fail_all(group: list[Ticket], code: str, message: str) -> None:
    for ticket in group:
        ticket.fail(code, message)
