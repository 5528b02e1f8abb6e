"""SQLite writers queue in the kernel, in order (djangollmapi.sqlite.base): one writer at
a time across threads and processes, a waiter that outwaits the timeout fails as SQLite
would, and the lock is always given back."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest
from django.db import OperationalError, connections, transaction

from djangollmapi.sqlite.base import FifoLock
from tests.helpers import wait_until
from tests.sqlite_holder import hold_a_transaction

ALIASES = iter(range(1_000_000))


def database(path: Path, timeout_s: float = 5) -> str:
    """A database alias of its own on `path`, with this backend and our pragmas."""
    alias = f"writers{next(ALIASES)}"
    filled = connections.configure_settings(
        {
            "default": {},  # configure_settings insists on one; it is not this test's
            alias: {
                "ENGINE": "djangollmapi.sqlite",
                "NAME": str(path),
                "OPTIONS": {
                    "timeout": timeout_s,
                    "transaction_mode": "IMMEDIATE",
                    "init_command": "PRAGMA journal_mode=WAL;",
                },
            },
        }
    )
    connections.settings[alias] = filled[alias]
    with connections[alias].cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS written (who TEXT, at REAL)")
    return alias


@pytest.fixture(autouse=True)
def own_databases(django_db_blocker):
    """These tests make their own SQLite files: no test database involved."""
    with django_db_blocker.unblock():
        yield
    for alias in [name for name in connections.settings if name.startswith("writers")]:
        connections[alias].close()
        del connections.settings[alias]


def write(alias: str, who: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute("INSERT INTO written VALUES (%s, %s)", [who, time.time()])


def written(alias: str) -> list[str]:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT who FROM written ORDER BY rowid")
        return [row[0] for row in cursor.fetchall()]


def in_thread(work) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(work())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_the_fifo_lock_hands_over_in_the_order_asked():
    lock, order = FifoLock(), []
    assert lock.acquire(1)
    waiters = []
    for name in "abc":
        thread, _ = in_thread(lambda name=name: (lock.acquire(5), order.append(name), lock.release()))
        waiters.append(thread)
        wait_until(lambda n=len(waiters): len(lock.waiters) == n, 5, f"waiter {name} to queue")
    lock.release()
    for thread in waiters:
        thread.join(5)
    assert order == ["a", "b", "c"]
    assert lock.acquire(0.1)  # free again


def test_a_waiter_past_its_timeout_gives_up_and_leaves_the_queue():
    lock = FifoLock()
    assert lock.acquire(1)
    assert lock.acquire(0.1) is False
    assert not lock.waiters
    lock.release()
    assert lock.acquire(0.1)


def test_a_thread_outwaiting_an_open_transaction_fails_like_sqlite(tmp_path):
    handler = database(tmp_path / "db.sqlite3", timeout_s=0.5)
    with transaction.atomic(using=handler):  # this thread's connection holds the writer lock
        write(handler, "holder")
        thread, outcome = in_thread(lambda: write(handler, "waiter"))
        thread.join(10)
    assert isinstance(outcome[0], OperationalError) and "locked" in str(outcome[0])
    write(handler, "after")
    assert written(handler) == ["holder", "after"]


def test_the_lock_is_given_back_on_rollback_and_on_close(tmp_path):
    handler = database(tmp_path / "db.sqlite3", timeout_s=0.5)
    with pytest.raises(ZeroDivisionError), transaction.atomic(using=handler):
        write(handler, "rolled back")
        1 / 0  # noqa: B018
    thread, outcome = in_thread(lambda: write(handler, "next"))
    thread.join(10)
    assert outcome == [None]
    transaction.atomic(using=handler).__enter__()
    write(handler, "unfinished")
    connections[handler].close()  # closed in the middle of a transaction: the lock goes too
    thread, outcome = in_thread(lambda: (write(handler, "after close"), written(handler))[1])
    thread.join(10)
    assert outcome == [["next", "after close"]]


def hold_in_another_process(path: Path, seconds: float):
    """Start a process that holds a write transaction on `path` for `seconds`."""
    context = multiprocessing.get_context("spawn")
    holding, release = context.Event(), context.Event()
    other = context.Process(target=hold_a_transaction, args=(str(path), holding, release))
    other.start()
    assert holding.wait(60), "the other process did not start its transaction"
    threading.Timer(seconds, release.set).start()
    return other


def test_a_writer_in_another_process_is_waited_for(tmp_path):
    path = tmp_path / "db.sqlite3"
    handler = database(path, timeout_s=10)
    other = hold_in_another_process(path, 1.0)
    thread, outcome = in_thread(lambda: write(handler, "this process"))
    time.sleep(0.5)
    assert thread.is_alive(), "wrote while the other process held the database"
    thread.join(30)
    other.join(30)
    assert outcome == [None]
    assert written(handler) == ["other process", "this process"]


def test_a_writer_in_another_process_held_past_the_timeout_fails_like_sqlite(tmp_path):
    path = tmp_path / "db.sqlite3"
    handler = database(path, timeout_s=0.5)
    other = hold_in_another_process(path, 3.0)
    began = time.monotonic()
    with pytest.raises(OperationalError, match="locked"):
        write(handler, "too late")
    assert time.monotonic() - began < 3.0
    other.join(30)
    write(handler, "after")
    assert written(handler) == ["other process", "after"]
