"""Which queue serves a device, who its workers are, and which replica a job goes to.

One queue per device name (`dla.device.cuda-0`); every worker of that name, on any
host, takes jobs from it, one process per device per host, so a GPU never runs two
of its processes' jobs at once. A worker is known by its name, `<queue>@<node>` (the
node is `[worker] node`, env `DLA_NODE`, or the hostname): what Celery calls it, what
a job's `worker` column records, and the field its heartbeat is kept under.

A deployment with `devices = [...]` has a replica on each: `choose_replica` sends a
job to the one with the shortest expected wait, from what each queue's workers
publish (`llmjobs.events`). (Which backend serves a model name is
`djangollmapi.routes.route_model`.)
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

QUEUE_PREFIX = "dla.device."
DEFAULT_JOB_S = 1.0  # a job's expected time on a replica that has measured none yet


def device_queue_name(device: str) -> str:
    return QUEUE_PREFIX + device.replace(":", "-")


def queue_device(queue: str) -> str:
    """The device a queue serves (`dla.device.cuda-0` -> `cuda:0`)."""
    return queue.removeprefix(QUEUE_PREFIX).replace("-", ":")


def worker_name(queue: str, node: str) -> str:
    """The name of `queue`'s worker on `node` (also its Celery node name)."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", queue) + "@" + node


def local_node() -> str:
    """This host's node: `[worker] node` (env `DLA_NODE`), else the hostname."""
    from django.conf import settings

    return settings.LLM_CONFIG.worker.node or socket.gethostname()


# --- what a queue looks like to the web tier ---------------------------------------


@dataclass(frozen=True)
class WorkerState:
    """One live worker of a queue, as it last published itself: the jobs it holds
    (`holding`: waiting and running), how many of them wait for a slot, its models'
    load states and, per deployment, its slots and recent job time."""

    name: str
    holding: int = 0
    waiting: int = 0
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    pace: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> {max_batch, job_s}


@dataclass(frozen=True)
class QueueState:
    """A device queue: its live workers (a fresh heartbeat each), the messages still in
    its Redis list (no worker took them yet), and the jobs sent to it since its workers
    last published (`pending`: on their way, counted by no one else yet)."""

    queue: str
    workers: tuple[WorkerState, ...] = ()
    listed: int = 0
    pending: int = 0

    @property
    def alive(self) -> bool:
        return bool(self.workers)

    @property
    def depth(self) -> int:
        """Jobs waiting for the device, held or still listed: what `max_queue_depth` bounds."""
        return self.listed + sum(worker.waiting for worker in self.workers)

    @property
    def queued(self) -> int:
        """Jobs not yet started: listed, on their way, or held waiting for a slot."""
        return self.depth + self.pending

    @property
    def load(self) -> int:
        """Every job the queue still has to end, running ones included."""
        return self.listed + self.pending + sum(worker.holding for worker in self.workers)

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        """Each model's load state over the live workers: `loaded` where any loaded it,
        else `failed` (with a reason) where any failed, else `not_loaded`."""
        rank = {"loaded": 2, "failed": 1}
        merged: dict[str, dict[str, Any]] = {}
        for worker in self.workers:
            for name, load in worker.models.items():
                current = merged.get(name)
                if current is None or rank.get(load.get("state"), 0) > rank.get(current.get("state"), 0):
                    merged[name] = load
        return merged

    def failed(self, model: str) -> bool:
        """Whether `model` failed to load on every live worker of the queue."""
        return self.models.get(model, {}).get("state") == "failed"

    def expected_wait_s(self, model: str) -> float:
        """How long a job of `model` sent now would wait: every job the queue has to end,
        over its slots for `model` (each live worker's `max_batch`), at the recent time
        of a `model` job there (`DEFAULT_JOB_S` before any was measured)."""
        paces = [worker.pace.get(model) or {} for worker in self.workers]
        slots = sum(max(1, int(pace.get("max_batch") or 1)) for pace in paces) or 1
        measured = [float(pace["job_s"]) for pace in paces if pace.get("job_s")]
        job_s = sum(measured) / len(measured) if measured else DEFAULT_JOB_S
        return self.load / slots * job_s


def choose_replica(states: Sequence[QueueState], model: str) -> int:
    """Which of a deployment's queues (`states`, in config order) a job of `model` goes
    to: among those with a live worker where `model` has not failed to load, the one
    with the shortest expected wait, ties to the fewest queued, then config order. With
    none, a live one (its 503 says the model failed), else the first (its 503 says no
    worker serves it), as for a deployment on one device."""
    usable = [i for i, state in enumerate(states) if state.alive and not state.failed(model)]
    candidates = usable or [i for i, state in enumerate(states) if state.alive] or [0]
    return min(candidates, key=lambda i: (states[i].expected_wait_s(model), states[i].queued, i))
