"""The web process is stopping: waits that would outlast its grace end early, answered.

On SIGTERM gunicorn gives the requests in flight `graceful_timeout` (10 s) and then
exits, which resets every connection still open: a client waiting on a long job would
get no answer at all. So the web worker marks the process as draining
(`djangollmapi.webworker`), and each follow of a job (`llmjobs.follow`) stops waiting
at `stop_at()`, early enough that its longest read still ends inside the grace: the
job is failed and refunded, and its client gets a JSON 503 `server_stopping` (or that
SSE error event) it can retry on another process. Calls that end before then are
answered as usual.
"""

from __future__ import annotations

import time

READ_ALLOWANCE_S = 6.0  # the longest blocking read of a follow (5 s) and the answer after it

_stop_at: float | None = None


def begin(grace_s: float) -> None:
    """Called once, from the web worker's SIGTERM handler."""
    global _stop_at
    _stop_at = time.monotonic() + max(grace_s - READ_ALLOWANCE_S, min(1.0, grace_s / 2))


def stop_at() -> float | None:
    """When waits must have ended (a `time.monotonic()` value), or None: not draining."""
    return _stop_at


def draining() -> bool:
    return _stop_at is not None
