"""Keeping child processes alive: the restart backoff shared by `serve` (which keeps
the embedded Redis, each device's `runworker` and gunicorn running) and `runworker`
(which keeps its worker process running), and `serve`'s watch over one child.

A child that dies is started again after a pause that doubles while it keeps dying
(0.5 s, 1 s, 2 s, ... at most 30 s) and is short again once a run lasted a minute,
so a crash is repaired at once and a crash loop does not spin.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from djangollmapi import processes

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STEADY_S = 60.0  # a process that ran this long was healthy: the next restart is prompt again
LEFTOVERS_GRACE_S = 15.0  # what a dead child started may take to finish its work before it is killed


@dataclass
class Backoff:
    """The pause before the next restart of a child that ran `ran_s` before dying."""

    delay_s: float = 0.0

    def after(self, ran_s: float) -> float:
        steady = ran_s > STEADY_S
        self.delay_s = FIRST_BACKOFF_S if steady or not self.delay_s else min(self.delay_s * 2, MAX_BACKOFF_S)
        return self.delay_s


def group_alive(pgid: int) -> bool:
    """Whether a live process is left in the process group `pgid` (a child started in
    its own session leads one, and what it starts stays in it). Read from /proc, as
    a zombie counts as dead: an init that never reaps would keep it forever."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it ended while we looked
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


@dataclass
class Child:
    """One process `serve` keeps running: `start` makes it (again). After it died,
    `watch` waits out its backoff and, with `wait_for_group`, for what it had started
    (a `runworker`'s worker process, which finishes its jobs on the SIGTERM its
    parent's death sends), killing that after LEFTOVERS_GRACE_S; then runs
    `before_restart` (clean up after it) and starts it again."""

    name: str
    start: Callable[[], subprocess.Popen]
    wait_for_group: bool = False
    before_restart: Callable[[], None] | None = None
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff: Backoff = field(default_factory=Backoff)
    restart_at: float | None = None
    leftovers_deadline: float = 0.0

    def launch(self) -> subprocess.Popen:
        self.process, self.started_at, self.restart_at = self.start(), time.monotonic(), None
        return self.process

    def exited(self) -> int | None:
        """Its exit status if it is dead, else None."""
        return None if self.process is None else self.process.poll()

    def watch(self, say: Callable[[str], None]) -> None:
        """One look at the child: notice its death (and say when it comes back), or
        restart it once its time has come."""
        status = self.exited()
        if status is None:
            return
        now = time.monotonic()
        if self.restart_at is None:
            delay = self.backoff.after(now - self.started_at)
            self.restart_at, self.leftovers_deadline = now + delay, now + LEFTOVERS_GRACE_S
            say(f"{self.name} exited with status {status}; restarting in {delay:g} s")
            return
        if now < self.restart_at or self.leftovers_left(now, say):
            return
        if self.before_restart is not None:
            self.before_restart()
        self.launch()
        say(f"{self.name} restarted (pid {self.process.pid})")

    def stop(self) -> None:
        """SIGTERM and wait (`processes.stop`); what a dead child had started gets
        LEFTOVERS_GRACE_S to end, as before a restart."""
        if self.process is None:
            return
        processes.stop(self.process)
        deadline = time.monotonic() + LEFTOVERS_GRACE_S
        while self.wait_for_group and group_alive(self.process.pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                return
            time.sleep(0.1)

    def leftovers_left(self, now: float, say: Callable[[str], None]) -> bool:
        """Whether the dead child's own children still run (the restart waits for them)."""
        if not self.wait_for_group or not group_alive(self.process.pid):
            return False
        if now < self.leftovers_deadline:
            return True
        say(f"what {self.name} started still runs after {LEFTOVERS_GRACE_S:g} s; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return group_alive(self.process.pid)
