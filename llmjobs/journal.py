"""Write-behind finishes: an answered call's record is appended to this process's
journal file, and a writer thread writes it to the database, in batches, off the
request's path.

Why it cannot lose a call: the line is written (one `write(2)` on a file opened for
appending) before the client gets the answer, so once the client has it the record
is in the kernel, whatever happens to the process next. The writer writes each batch
in one transaction through the lifecycle's own once-only finish (a job already ended
is left alone), and empties the file only when every line in it is written. A process
that dies (killed, out of memory) leaves its file; the next web process on the host
(at its start, then every `RECOVER_EVERY_S`) takes each file whose owner holds no lock
on it any more, writes its lines the same way and deletes it. Writing a line twice
changes nothing, so a crash between a batch's commit and the file's truncation costs
nothing either. Once a dead process's lines are written, what it was still running
(its `orphaned` calls, killed mid-call) is ended too, by the journal's name: the file
is also the proof that its process lives, so every web process keeps one, with
write-behind off as well. What it does not survive: the host's own crash before the kernel wrote
the file back, or the loss of its disk (`[server] write_behind = false` then).

Until its line is written a finished job still reads `running`, its key holds its
reservation, and its day's rollup lacks it: a few milliseconds under load, what a
batch takes. Quota, budgets and rate limits stay exact meanwhile, held to what the job
reserved (never less than it used); its rate limits are settled at once, in Redis.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from django.conf import settings

log = logging.getLogger(__name__)

RECOVER_EVERY_S = 30.0
RETRY_AFTER_S = (0.1, 0.5, 1.0, 2.0, 5.0)  # after a batch failed (the database down)
MAX_BATCH = 200  # lines a batch writes at most: one query, its locks held that long
SUFFIX = ".journal"

Entry = dict[str, Any]
Writer = Callable[[list[Entry]], None]
# Ends what the dead process of this journal name was running, but the jobs its lines answered.
Orphans = Callable[[str, set[str]], Any]
Running = Callable[[str], bool]  # whether the process of this journal name still runs calls


class Journal:
    """One process's journal: its file, the lines not yet written, and its writer."""

    def __init__(
        self,
        directory: Path,
        write: Writer,
        wait_s: float = 0.0,
        orphaned: Orphans | None = None,
        running: Running | None = None,
    ) -> None:
        self.directory, self.write, self.wait_s = directory, write, wait_s
        self.orphaned, self.running = orphaned, running
        directory.mkdir(parents=True, exist_ok=True)
        self.name = f"{os.getpid()}-{time.time_ns()}"  # unique to this process's life
        self.path = directory / f"{self.name}{SUFFIX}"
        making = directory / f"{self.name}.new"  # no recovery looks at it before it is locked
        self.fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # held for the process's life: it is alive
        os.rename(making, self.path)
        self.pending: list[Entry] = []
        self.writing = 0  # lines taken by the writer, not yet committed
        self.changed = threading.Condition()
        self.stopping = self.closed = False
        self.thread = threading.Thread(target=self.write_forever, name="dla-journal", daemon=True)
        self.thread.start()

    def record(self, entry: Entry) -> bool:
        """Append the entry to the file, then hand it to the writer; False when it
        cannot (the journal is closing, its writer died, the disk refused the line):
        the caller then writes the record itself."""
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with self.changed:
            if self.closed or not self.thread.is_alive():
                return False
            try:
                os.write(self.fd, line)
            except OSError as exc:
                log.error("the journal %s refused a line (%s); writing the record at once", self.path, exc)
                return False
            self.pending.append(entry)
            self.changed.notify()
            return True

    def write_forever(self) -> None:
        failures = 0
        self.recovered_at = 0.0
        while True:
            try:
                if self.write_once():
                    failures = 0
                else:
                    failures += 1
            except Exception:  # the writer must outlive any one failure, or lines wait for ever
                log.exception("the journal writer of %s hit an error; going on", self.path)
                failures += 1
            if self.stopping and not self.pending:
                return
            if failures:
                time.sleep(RETRY_AFTER_S[min(failures, len(RETRY_AFTER_S)) - 1])

    def write_once(self) -> bool:
        """Recover dead processes' journals when it is time, wait for lines (and for a
        batch to gather), write them; False when a batch could not be written."""
        if time.monotonic() - self.recovered_at > RECOVER_EVERY_S:
            self.recovered_at = time.monotonic()
            recover(self.directory, self.write, own=self.path, orphaned=self.orphaned)
        with self.changed:
            if not self.pending and not self.stopping:
                self.changed.wait(timeout=RECOVER_EVERY_S)
            if not self.pending:
                return True
        if self.wait_s:
            with self.changed:  # a batch gathers; a stop cuts the wait short
                self.changed.wait_for(lambda: self.stopping, timeout=self.wait_s)
        return self.write_pending()

    def write_pending(self) -> bool:
        """Write what is pending in one batch; True when it was written (or there was
        nothing). The file is emptied once nothing in it is left unwritten."""
        with self.changed:
            batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
            self.writing = len(batch)
        if not batch:
            return True
        try:
            self.write(batch)
        except Exception:
            log.exception("writing %d finished jobs failed; they stay in %s and are retried", len(batch), self.path)
            with self.changed:
                self.pending[:0] = batch
                self.writing = 0
            return False
        with self.changed:
            self.writing = 0
            if not self.pending:
                os.ftruncate(self.fd, 0)  # O_APPEND: the next line goes to the start
            self.changed.notify_all()  # for `drain`
        return True

    def drain(self, timeout_s: float) -> bool:
        """Wait until every line recorded so far is written; False on timeout."""
        with self.changed:
            return self.changed.wait_for(lambda: not self.pending and not self.writing, timeout=timeout_s)

    def close(self) -> None:
        """Write what is pending now (the process is leaving) and stop the writer. The
        file goes with it unless the process still runs calls (`running`: a graceful
        stop's grace ran out on a long one): then it stays, locked until the process
        exits, for the next process's recovery to end them."""
        with self.changed:
            if self.closed:
                return
            self.stopping = self.closed = True
            self.changed.notify()
        self.thread.join(timeout=30)
        with self.changed:
            if self.thread.is_alive() or self.pending or self.writing:
                log.error("the journal writer did not finish; %s is left for the next process", self.path)
                return
            if self.still_running():
                log.warning("calls still run as this process leaves; %s is left for the next process", self.path)
                return
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self.fd)

    def still_running(self) -> bool:
        if self.running is None:
            return False
        try:
            return self.running(self.name)
        except Exception:
            log.exception("could not tell whether calls still run; %s is kept", self.path)
            return True


def recover(directory: Path, write: Writer, own: Path | None = None, orphaned: Orphans | None = None) -> int:
    """Write each journal in `directory` whose process is gone (its lock is free), then
    let `orphaned` end what that process was still running (the journal's name says
    whose; its lines' jobs were answered, written or not), then delete it; the lines
    written."""
    written = 0
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        if path == own:
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # another process took it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process lives
            if not path.exists():
                continue  # taken and deleted meanwhile
            entries = list(read_entries(path))
            for start in range(0, len(entries), MAX_BATCH):
                write(entries[start : start + MAX_BATCH])
            if entries:
                log.warning("wrote %d finished jobs from %s, left by a process that died", len(entries), path.name)
            if orphaned is not None:
                orphaned(path.name.removesuffix(SUFFIX), {str(entry.get("id")) for entry in entries})
            path.unlink()
            written += len(entries)
        except Exception:
            log.exception("recovering %s failed; it is tried again later", path)
        finally:
            os.close(fd)
    return written


def read_entries(path: Path) -> Iterable[Entry]:
    """The whole lines of a journal; a last line cut short by the crash is no entry
    (its client never got an answer: the line is written before the answer is)."""
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        try:
            yield json.loads(line)
        except ValueError:
            log.error("a line of %s cannot be read; skipped", path.name)


_journal: Journal | None = None
_journal_pid = 0
_journal_lock = threading.Lock()


def journal_dir() -> Path:
    return settings.LLM_CONFIG.server.data_dir / "journal"


def journal(write: Writer, orphaned: Orphans | None = None, running: Running | None = None) -> Journal:
    """This process's journal, started on first use (after a fork: its own)."""
    global _journal, _journal_pid
    with _journal_lock:
        if _journal is None or _journal_pid != os.getpid():
            server = settings.LLM_CONFIG.server
            _journal = Journal(journal_dir(), write, server.write_behind_wait_ms / 1000, orphaned, running)
            _journal_pid = os.getpid()
            atexit.register(_journal.close)
        return _journal


def current() -> Journal | None:
    """This process's journal, if it started one (a forked child has none yet)."""
    with _journal_lock:
        return _journal if _journal_pid == os.getpid() else None


def drain(timeout_s: float = 10.0) -> bool:
    """Wait until this process's journal has written every line recorded so far (True
    at once when it has none), e.g. before reading what its calls recorded."""
    book = current()
    return book is None or book.drain(timeout_s)


def close() -> None:
    """Write what this process has pending and stop its writer (a web worker exits)."""
    book = current()
    if book is not None:
        book.close()
