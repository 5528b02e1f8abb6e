"""Django's SQLite backend, with writers queued in the kernel instead of SQLite's busy
handler.

SQLite lets one writer in at a time. A writer that finds the file locked sleeps in
SQLite's busy handler (1, 2, 5, 10, ... up to 100 ms between tries) and tries again,
so under load the unlucky ones sleep past many commits that were quick: a long p99
tail while the database sat idle between sleeps. Here every write transaction first
takes a lock of its own: a first-come first-served lock between the threads of a
process, then `flock` on a file beside the database between processes (web workers,
device workers, commands), retried every 0.1-0.5 ms, so a waiter goes in about when the
holder lets go. SQLite's own lock is then free whenever it is asked for. Both waits
give up after the database's `timeout` as SQLite would ("database is locked").

What takes the lock: `atomic` blocks (their `BEGIN IMMEDIATE`, held to the commit or
rollback) and single writes outside one (`INSERT`, `UPDATE`, `DELETE`, `REPLACE` in
autocommit). Reads never wait: WAL readers do not block the writer, nor it them.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from django.db import OperationalError
from django.db.backends.sqlite3 import base

WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")
# How a process waiting for another's writer polls `flock`: first after this pause,
# doubling to at most the second. A holder lets go every few tenths of a millisecond,
# and a process that sleeps past that leaves its threads stalled (and a core idle)
# while the other takes the lock back again and again (bench/sqlite_writers.py
# compares these polls with the 0.5-2 ms ones they replaced).
FLOCK_PAUSE_S = (0.0001, 0.0005)


class FifoLock:
    """A lock taken in the order it was asked for: a plain Lock lets the thread that
    just let go take it again at once, and the others starve (a long tail)."""

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.waiters: collections.deque[threading.Lock] = collections.deque()
        self.held = False

    def acquire(self, timeout: float) -> bool:
        with self.guard:
            if not self.held and not self.waiters:
                self.held = True
                return True
            turn = threading.Lock()
            turn.acquire()
            self.waiters.append(turn)
        if turn.acquire(timeout=timeout):
            return True  # handed over by release(): held is still True
        with self.guard:
            if turn in self.waiters:
                self.waiters.remove(turn)
                return False
        return True  # handed over just as the wait timed out

    def release(self) -> None:
        with self.guard:
            if self.waiters:
                self.waiters.popleft().release()
            else:
                self.held = False


class WriterLock:
    """One writer at a time on one database file, across threads and processes."""

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.threads = FifoLock()
        self.fd: int | None = None

    def acquire(self) -> None:
        # The thread lock times out as SQLite would have ("database is locked"), so a
        # thread that waits on one holding a transaction open fails instead of hanging.
        if not self.threads.acquire(timeout=self.timeout_s):
            raise OperationalError("database is locked (waited for this process's writer)")
        try:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self.lock_file(time.monotonic() + self.timeout_s)
        except BaseException:
            self.threads.release()
            raise

    def lock_file(self, deadline: float) -> None:
        """`flock`, retried every 0.1-0.5 ms (`FLOCK_PAUSE_S`; SQLite's busy handler
        sleeps up to 100 ms), and given up at the deadline as SQLite would (flock itself
        has no timeout). Only one thread of a process waits here: the others wait in
        `threads`, so the polls cost one syscall pair a tenth of a millisecond at most."""
        pause, longest = FLOCK_PAUSE_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise OperationalError("database is locked (waited for another process's writer)") from None
                time.sleep(pause)
                pause = min(pause * 2, longest)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.threads.release()


_locks: dict[str, WriterLock] = {}
_locks_guard = threading.Lock()


def writer_lock(database: str, timeout_s: float) -> WriterLock:
    """The process's lock for `database` (made once; a forked child makes its own)."""
    with _locks_guard:
        found = _locks.get(database)
        if found is None:
            found = _locks[database] = WriterLock(f"{database}.writer-lock", timeout_s)
        return found


def forget_locks_after_fork() -> None:
    global _locks_guard
    _locks.clear()  # the parent's flock is not this process's to release
    _locks_guard = threading.Lock()


os.register_at_fork(after_in_child=forget_locks_after_fork)


class DatabaseWrapper(base.DatabaseWrapper):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.holds_writer_lock = False
        self.lock_for: tuple[str | None, WriterLock | None] = (None, None)
        wrapper = self

        class Cursor(base.SQLiteCursorWrapper):
            """Writes outside a transaction take the writer lock for the statement."""

            def execute(self, query, params=None):
                if wrapper.in_atomic_block or not query.lstrip()[:7].upper().startswith(WRITES):
                    return super().execute(query, params)
                with wrapper.writer_lock_held():
                    return super().execute(query, params)

            def executemany(self, query, param_list):
                if wrapper.in_atomic_block:
                    return super().executemany(query, param_list)
                with wrapper.writer_lock_held():
                    return super().executemany(query, param_list)

        self.cursor_class = Cursor

    def lock(self) -> WriterLock | None:
        name = self.settings_dict["NAME"]
        if self.lock_for[0] != name:  # the test runner renames the database once
            found = None
            if not self.is_in_memory_db():
                timeout_s = float(self.settings_dict.get("OPTIONS", {}).get("timeout", 5))
                found = writer_lock(str(Path(name).resolve()), timeout_s)
            self.lock_for = (name, found)
        return self.lock_for[1]

    def take_writer_lock(self) -> None:
        lock = self.lock()
        if lock is not None and not self.holds_writer_lock:
            lock.acquire()
            self.holds_writer_lock = True

    def give_back_writer_lock(self) -> None:
        if self.holds_writer_lock:
            self.holds_writer_lock = False
            self.lock().release()

    @contextlib.contextmanager
    def writer_lock_held(self) -> Iterator[None]:
        self.take_writer_lock()
        try:
            yield
        finally:
            self.give_back_writer_lock()

    def create_cursor(self, name=None):
        return self.connection.cursor(factory=self.cursor_class)

    def _start_transaction_under_autocommit(self) -> None:
        self.take_writer_lock()
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self.give_back_writer_lock()
            raise

    def _commit(self):
        try:
            return super()._commit()
        finally:
            self.give_back_writer_lock()

    def _rollback(self):
        try:
            return super()._rollback()
        finally:
            self.give_back_writer_lock()

    def _close(self):
        try:
            return super()._close()
        finally:
            self.give_back_writer_lock()
