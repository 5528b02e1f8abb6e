"""The one load generator of the benchmarks: keep-alive HTTP clients in this process.

A `Pool` holds N clients, each a thread's own keep-alive `http.client` connection
(reopened after any failure); `Pool.run` spreads a fixed number of calls over them
(or runs until a stop event), checks each answer with the caller's `Load.check`,
collects the latencies, counts errors by kind and keeps the first few for the report;
`Pool.warm_up` runs the same load unmeasured first. With `Load.stream` each call reads
an SSE stream (`read_stream`) and is timed to its first content chunk and to
`[DONE]`. `stream_once` and `call_once` make one call on a fresh connection.

Standard library only, the same client code for every target, so that numbers taken
against different servers compare: `http.client` is cheaper per call than `requests`,
which matters when the client shares 2 cores with the server it measures.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
DESCRIPTION = "a thread + keep-alive http.client connection per client, in this process"
REQUEST_TIMEOUT_S = 30
ERROR_SAMPLES = 10


class CallError(Exception):
    """One failed call: its kind (for counting) and a detail (for the samples)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail[:300]}")
        self.kind = kind
        self.detail = detail


@dataclass
class Streamed:
    """What an SSE chat stream carried; times in seconds from the request being sent."""

    text: str = ""
    first_s: float | None = None  # the first event with content
    last_s: float | None = None  # the last event with content
    done_s: float | None = None  # data: [DONE]
    usage: dict = field(default_factory=dict)
    finish_reason: str = ""
    events: int = 0


@dataclass
class Reply:
    """One answer as a check sees it: the body of a plain call, or the stream."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes = b""
    streamed: Streamed | None = None
    headers_s: float = 0.0  # request sent -> status line and headers
    total_s: float = 0.0  # request sent -> the whole answer read


@dataclass(frozen=True)
class Load:
    """What every call of a run sends, and how its answer is checked.

    `body` is fixed bytes, or a function of the call's index (0..n-1 within a run);
    `check(index, reply)` raises `CallError` for a wrong answer. The status must be
    `expect_status` before the check runs.
    """

    path: str
    headers: Mapping[str, str]
    body: bytes | Callable[[int], bytes] | None = None
    method: str = "POST"
    expect_status: int = 200
    stream: bool = False
    check: Callable[[int, Reply], None] | None = None

    def body_for(self, index: int) -> bytes | None:
        return self.body(index) if callable(self.body) else self.body


@dataclass
class Timing:
    total_s: float  # request sent -> answer read (streaming: the whole stream)
    first_chunk_s: float | None = None  # streaming only: to the first event with content


@dataclass
class Outcome:
    """What a run of calls from several clients gave."""

    stream: bool = False
    timings: list[Timing] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    attempted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def add_error(self, kind: str, detail: str) -> None:
        with self.lock:
            self.errors[kind] += 1
            if len(self.error_samples) < ERROR_SAMPLES:
                self.error_samples.append(f"{kind}: {detail[:300]}")


def merged(outcomes: list[Outcome]) -> Outcome:
    """Several runs of one case as one (its rounds, each run between other cases' so
    that a slow spell of a shared machine falls on every case alike)."""
    total = Outcome(stream=bool(outcomes) and outcomes[0].stream)
    for outcome in outcomes:
        total.timings += outcome.timings
        total.errors += outcome.errors
        total.error_samples += outcome.error_samples
        total.wall_s += outcome.wall_s
        total.attempted += outcome.attempted
    return total


def round_sizes(n: int, rounds: int) -> list[int]:
    """`n` calls in `rounds` rounds as even as can be (none empty)."""
    rounds = max(1, min(rounds, n))
    return [n // rounds + (1 if index < n % rounds else 0) for index in range(rounds)]


# ---------------------------------------------------------------- reading answers


def sse_events(response: http.client.HTTPResponse) -> Iterator[tuple[float, bytes]]:
    """(arrival time, raw event) as bytes come off the socket: `read1` returns what has
    arrived (de-chunked) without waiting for more, so the timestamps are the arrivals."""
    buffer = b""
    while chunk := response.read1(65536):
        now = time.perf_counter()
        buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            yield now, event


def read_stream(response: http.client.HTTPResponse, t0: float) -> Streamed:
    """Read an OpenAI-style SSE stream through `[DONE]` and the end of the body (so the
    connection can be reused): the content, usage, finish reason and arrival times."""
    out = Streamed()
    pieces: list[str] = []
    for arrived, event in sse_events(response):
        data = event.removeprefix(b"data:").strip()
        if not data or event.startswith(b":"):
            continue
        if data == b"[DONE]":
            out.done_s = arrived - t0
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            raise CallError("bad event", data[:300].decode("utf-8", "replace")) from None
        if "error" in chunk:
            raise CallError("error event", json.dumps(chunk["error"])[:300])
        out.events += 1
        out.usage = chunk.get("usage") or out.usage
        for choice in chunk.get("choices") or []:
            out.finish_reason = choice.get("finish_reason") or out.finish_reason
            if text := (choice.get("delta") or {}).get("content"):
                out.first_s = arrived - t0 if out.first_s is None else out.first_s
                out.last_s = arrived - t0
                pieces.append(text)
    else:
        raise CallError("no [DONE]", "".join(pieces)[:300])
    response.read()  # the rest (the last chunk's terminator)
    out.text = "".join(pieces)
    return out


def exchange(conn: http.client.HTTPConnection, load: Load, index: int) -> Reply:
    """Send call `index` of `load` on `conn` and read the whole answer, timed."""
    t0 = time.perf_counter()
    conn.request(load.method, load.path, body=load.body_for(index), headers=dict(load.headers))
    response = conn.getresponse()
    reply = Reply(response.status, response.headers, headers_s=time.perf_counter() - t0)
    if response.status != load.expect_status:
        raise CallError(f"HTTP {response.status}", response.read()[:300].decode("utf-8", "replace"))
    if load.stream and response.status == 200:
        reply.streamed = read_stream(response, t0)
    else:
        reply.body = response.read()
    reply.total_s = time.perf_counter() - t0
    return reply


# ---------------------------------------------------------------- clients


class Client:
    """One client: a keep-alive connection, reopened after any failure."""

    def __init__(self, port: int, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self.conn = self.connect()

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=self.timeout_s)

    def call(self, load: Load, index: int) -> Timing:
        """One checked call; its timing, or `CallError` (the connection is then reopened)."""
        try:
            reply = exchange(self.conn, load, index)
            if load.check is not None:
                load.check(index, reply)
        except CallError:
            self.reopen()
            raise
        except (OSError, http.client.HTTPException) as exc:
            self.reopen()
            raise CallError(type(exc).__name__, str(exc)) from None
        return Timing(reply.total_s, reply.streamed.first_s if reply.streamed else None)

    def reopen(self) -> None:
        self.conn.close()
        self.conn = self.connect()

    def close(self) -> None:
        self.conn.close()


class Pool:
    """N clients on one port; a context manager that closes their connections."""

    def __init__(self, port: int, clients: int, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.clients = [Client(port, timeout_s) for _ in range(clients)]

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def warm_up(self, load: Load, requests: int) -> Outcome:
        """Unmeasured calls first (at least two per client, so every connection is open)."""
        return self.run(load, max(requests, 2 * len(self.clients)))

    def run(self, load: Load, n: int, stop: threading.Event | None = None, max_errors: int = 0) -> Outcome:
        """n calls shared by the clients (a thread each); with `stop`, until it is set
        (n is then the ceiling); with `max_errors`, until that many calls have failed (a
        server that has stalled: each call costs the timeout). Each call's index is its
        place in the run."""
        outcome = Outcome(stream=load.stream)
        remaining = iter(range(n))

        def work(client: Client) -> None:
            mine: list[Timing] = []
            while stop is None or not stop.is_set():
                with outcome.lock:
                    given_up = max_errors and outcome.error_count >= max_errors
                    index = None if given_up else next(remaining, None)
                    if index is None:
                        break
                    outcome.attempted += 1
                try:
                    mine.append(client.call(load, index))
                except CallError as exc:
                    outcome.add_error(exc.kind, exc.detail)
            with outcome.lock:
                outcome.timings.extend(mine)

        outcome.wall_s = run_in_threads(work, self.clients)
        return outcome


def run_in_threads(target: Callable[[Any], None], args: Iterable[Any]) -> float:
    """`target(arg)` in a daemon thread per arg, all started together; the wall seconds
    until the last one ends (joined with a timeout, so Ctrl-C gets through)."""
    threads = [threading.Thread(target=target, args=(arg,), daemon=True) for arg in args]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
    return time.perf_counter() - started


# ---------------------------------------------------------------- single calls


def stream_once(port: int, load: Load, timeout_s: float = REQUEST_TIMEOUT_S) -> Reply:
    """One streamed call on a fresh connection; the reply (`streamed` set), unchecked
    but for the status. Raises `CallError` or OSError."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        return exchange(conn, load, 0)
    finally:
        conn.close()


def call_once(
    port: int, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """One plain call on a fresh connection: (status, body). Raises OSError or
    http.client.HTTPException when nothing answers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
