"""Which waiting job of a deployment gets the next free slot: fair across keys, in
order within one key.

Start-time fair queuing over keys: each key that has jobs waiting carries a start
tag, and the key with the smallest tag gets the slot; it then moves on by `1 /
weight`. A key that starts waiting takes the current virtual time (the tag of the
last slot given), so a key that sends one job while another has 200 queued gets the
next free slot, not the 201st; a key of weight 2 gets two slots for every one of a
key of weight 1; a key that was away earns no credit for the turns it missed.
Within a key, jobs go by their `order` (when they were sent), whatever order they
reached the worker in. Pure logic (no Redis, no database): the device loop keeps one
per deployment.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Key(Generic[T]):
    jobs: list[tuple[float, int, str, T]] = field(default_factory=list)  # heap: (order, seq, job id, item)
    weight: float = 1.0
    finish: float = 0.0  # where its next turn starts once it waits again
    turn: int | None = None  # seq of its one valid entry in the turns heap


class FairQueue(Generic[T]):
    """Waiting jobs of one deployment, taken in fair order across keys."""

    def __init__(self) -> None:
        self._keys: dict[Hashable, _Key[T]] = {}
        self._turns: list[tuple[float, int, Hashable]] = []  # heap: (start tag, seq, key) of waiting keys
        self._waiting: dict[str, Hashable] = {}  # job id -> key
        self._virtual_time = 0.0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._waiting)

    def push(self, job_id: str, key: Hashable, item: T, weight: float = 1.0, order: float | None = None) -> None:
        """Queue a job of `key` (None: jobs without a key count as one key)."""
        seq = next(self._seq)
        entry = self._keys.setdefault(key, _Key())
        entry.weight = max(float(weight), 1e-6)
        idle = entry.turn is None or not self._live_jobs(entry)
        heapq.heappush(entry.jobs, (seq if order is None else order, seq, job_id, item))
        self._waiting[job_id] = key
        if idle:
            entry.turn = seq
            heapq.heappush(self._turns, (max(self._virtual_time, entry.finish), seq, key))

    def pop(self) -> T | None:
        """The next job to run, or None when none waits."""
        turn = self._next_turn()
        if turn is None:
            return None
        start, _seq, key = heapq.heappop(self._turns)
        entry = self._keys[key]
        _order, _s, job_id, item = heapq.heappop(entry.jobs)
        del self._waiting[job_id]
        self._virtual_time = max(self._virtual_time, start)
        entry.finish = start + 1.0 / entry.weight
        entry.turn = None
        if self._live_jobs(entry):
            entry.turn = next(self._seq)
            heapq.heappush(self._turns, (entry.finish, entry.turn, key))
        if not self._waiting:
            self._keys.clear()  # nobody waits: past turns mean nothing any more
        return item

    def peek(self) -> T | None:
        """The job `pop` would return, left in place."""
        turn = self._next_turn()
        return self._keys[turn[2]].jobs[0][3] if turn is not None else None

    def remove(self, job_id: str) -> bool:
        """Take a waiting job out (cancelled before its turn); it is skipped lazily."""
        key = self._waiting.pop(job_id, None)
        if key is None:
            return False
        if not self._waiting:
            self._keys.clear()
            self._turns.clear()
        return True

    def position(self, job_id: str) -> int | None:
        """How many waiting jobs go before this one (0: it is next); None if not waiting."""
        if job_id not in self._waiting:
            return None
        for ahead, item_id in enumerate(self._job_ids_in_order()):
            if item_id == job_id:
                return ahead
        return None

    def items(self) -> list[T]:
        """The waiting jobs, in the order they would run."""
        by_id = {e[2]: e[3] for entry in self._keys.values() for e in entry.jobs if e[2] in self._waiting}
        return [by_id[job_id] for job_id in self._job_ids_in_order()]

    def _job_ids_in_order(self) -> list[str]:
        """Every waiting job id in the order they would run (a dry run of `pop`)."""
        turns = [turn for turn in self._turns if self._keys[turn[2]].turn == turn[1]]
        heapq.heapify(turns)
        jobs = {key: sorted(e for e in entry.jobs if e[2] in self._waiting) for key, entry in self._keys.items()}
        order = []
        while turns:
            start, _seq, key = heapq.heappop(turns)
            if not jobs[key]:
                continue
            order.append(jobs[key].pop(0)[2])
            if jobs[key]:
                heapq.heappush(turns, (start + 1.0 / self._keys[key].weight, next(self._seq), key))
        return order

    def _next_turn(self) -> tuple[float, int, Hashable] | None:
        """The head of the turns, after dropping stale ones (a key whose jobs were all
        removed, or a turn it has since replaced)."""
        while self._turns:
            _start, seq, key = self._turns[0]
            entry = self._keys[key]
            if entry.turn == seq and self._live_jobs(entry):
                return self._turns[0]
            heapq.heappop(self._turns)
            if entry.turn == seq:
                entry.turn = None
        return None

    def _live_jobs(self, entry: _Key[T]) -> bool:
        """Whether `entry` has a job still waiting; removed ones at its head are dropped."""
        while entry.jobs and entry.jobs[0][2] not in self._waiting:
            heapq.heappop(entry.jobs)
        return bool(entry.jobs)
