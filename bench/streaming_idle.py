"""Part 2 of bench/streaming.py: how many idle streams one gunicorn worker holds, what
each costs, and whether the jobs of closed streams get cancelled.

With gunicorn restarted as ONE gthread worker with T threads, an asyncio client (raw
sockets, one connection per stream, not `loadgen`: thousands of streams held open, not
calls repeated) opens T streams on the `idle-echo` model (one job runs, the others wait
queued: a client holding a connection and a web thread), each checked for HTTP 200 and
the role chunk; then a few more than T. All are held while the web worker's RSS/USS,
CPU, threads and fds and Redis's clients are read; then the served streams close, the
waiting ones get a thread and close too, and every job is looked up: all must end
`cancelled`, and how long after its client closed each one ended is reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psutil
from cpu import CpuMeter, child_pids, proc_cpu_s
from internals import JOB_TABLE, as_epoch, chat_input_like, device_queue
from report import fmt_share, print_columns, say, spread
from stack import Stack

IDLE_MODEL = "idle-echo"
IDLE_DEVICE = "cpu:1"
OPEN_CONCURRENCY = 64  # streams being set up at once; the rest wait their turn in this client
STALL_S = 5.0  # give up waiting for first events after this long without one arriving
MIB = 1024 * 1024


@dataclass(eq=False)
class StreamProbe:
    """One SSE stream held open by the asyncio client (times: perf_counter seconds)."""

    index: int
    started: float = 0.0
    headers_at: float | None = None
    first_event_at: float | None = None
    status: int | None = None
    error: str | None = None
    server_closed: bool = False
    closing: bool = False  # set by this client before it closes the connection
    closed_wall: float | None = None  # time.time() of this client's close, to compare with finished_at
    job_id: str | None = None  # X-Request-Id
    writer: asyncio.StreamWriter | None = field(default=None, repr=False)
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def served(self) -> bool:
        """HTTP 200 and the first (role) chunk arrived."""
        return self.status == 200 and self.first_event_at is not None


def stream_request(port: int, key: str, tag: str) -> bytes:
    body = json.dumps({"model": IDLE_MODEL, "messages": [{"role": "user", "content": tag}], "stream": True})
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


async def hold_stream(probe: StreamProbe, port: int, request: bytes, slots: asyncio.Semaphore | None) -> None:
    """Connect, send, wait for the headers and the first SSE event, then keep reading
    (keep-alives, the one running job's words) until either side closes."""
    if slots:
        await slots.acquire()
    try:
        probe.started = time.perf_counter()
        reader, probe.writer = await asyncio.open_connection("127.0.0.1", port)
        probe.writer.write(request)
        await probe.writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        probe.headers_at = time.perf_counter()
        probe.status = int(head.split(b" ", 2)[1])
        probe.job_id = header_value(head, b"x-request-id")
        seen = b""
        while not (b"data: " in seen and b"\n\n" in seen.split(b"data: ", 1)[1]):
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("closed before the first event")
            seen += data
        probe.first_event_at = time.perf_counter()
        if probe.status != 200 or b'"role":"assistant"' not in seen:
            probe.error = f"HTTP {probe.status}: {seen[:200]!r}"
        if slots:
            slots.release()
            slots = None
        while await reader.read(65536):
            pass
        probe.server_closed = not probe.closing
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        probe.error = f"{type(exc).__name__}: {exc}"
    finally:
        if slots:
            slots.release()


def header_value(head: bytes, name: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode()
    return None


async def close_streams(probes: list[StreamProbe]) -> None:
    """Close the client side (FIN); the server should see it between two reads of the job's events."""
    for probe in probes:
        probe.closing = True
        probe.closed_wall = time.time()
        if probe.writer is not None:
            probe.writer.close()
    tasks = [p.task for p in probes if p.task is not None]
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=10)
        for task in pending:
            task.cancel()


async def wait_for_first_events(probes: list[StreamProbe], limit_s: float, stall_s: float = STALL_S) -> float:
    """Until every probe has its first event or failed, `limit_s` passed, or none arrived
    for `stall_s` (streams stuck in a queue never will); the wait in seconds."""
    started = last_progress = time.perf_counter()
    done_before = -1
    while True:
        done = sum(1 for p in probes if p.first_event_at is not None or p.error or (p.task and p.task.done()))
        now = time.perf_counter()
        if done == len(probes) or now - started > limit_s or now - last_progress > stall_s:
            return now - started
        if done != done_before:
            done_before, last_progress = done, now
        await asyncio.sleep(0.05)


def web_memory(stack: Stack) -> dict:
    """RSS / USS (unique pages) of the gunicorn master and its one worker, the worker's
    threads and fds, and Redis's client connections."""
    master = psutil.Process(stack.pid("web"))
    workers = [psutil.Process(pid) for pid in child_pids(master.pid)]
    out: dict[str, Any] = {"master_rss_mib": master.memory_info().rss / MIB}
    if workers:
        info = workers[0].memory_full_info()
        out.update(
            worker_rss_mib=info.rss / MIB,
            worker_uss_mib=info.uss / MIB,
            worker_threads=workers[0].num_threads(),
            worker_fds=workers[0].num_fds(),
            worker_max_fd=max_fd(workers[0].pid),
        )
    out["redis_connected_clients"] = int(stack.redis.info("clients").get("connected_clients", 0))
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def max_fd(pid: int) -> int | None:
    """The highest fd number open: select.select() refuses any fd >= 1024 (FD_SETSIZE)."""
    try:
        return max(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return None


async def web_cpu_share(stack: Stack, seconds: float) -> float:
    """Share of one core the web worker burns over `seconds`: idle streams are not free,
    each thread wakes at least once per FOLLOW_SLICE_MS to look for a disconnect."""
    pid = child_pids(stack.pid("web"))[0]
    cpu0, t0 = proc_cpu_s(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    return round((proc_cpu_s(pid) - cpu0) / (time.perf_counter() - t0), 3)


def job_statuses(stack: Stack, tag: str) -> Counter:
    rows = stack.query(
        f"SELECT status, COUNT(*) FROM {JOB_TABLE} WHERE input_text LIKE {{p}} GROUP BY status", [chat_input_like(tag)]
    )
    return Counter({status: count for status, count in rows})


def cancel_latencies(stack: Stack, tag: str, probes: list[StreamProbe]) -> list[float]:
    """Seconds from each client's close to its job's finished_at: the web thread noticed
    and cancelled the job, or the worker recorded the cancellation at its next word."""
    closed = {uuid.UUID(p.job_id).hex: p.closed_wall for p in probes if p.job_id and p.closed_wall}
    rows = stack.query(f"SELECT id, finished_at FROM {JOB_TABLE} WHERE input_text LIKE {{p}}", [chat_input_like(tag)])
    return [
        as_epoch(finished) - closed[key]
        for job_id, finished in rows
        if (key := uuid.UUID(str(job_id)).hex) in closed and finished is not None
    ]


def wait_until_ended(stack: Stack, tag: str, expected: int, limit_s: float = 60) -> tuple[Counter, float]:
    """Poll the job rows until `expected` jobs with `tag` exist and none is queued or running."""
    t0 = time.perf_counter()
    while True:
        statuses = job_statuses(stack, tag)
        active = statuses["queued"] + statuses["running"]
        if (sum(statuses.values()) >= expected and not active) or time.perf_counter() - t0 > limit_s:
            return statuses, time.perf_counter() - t0
        time.sleep(0.25)


def wait_for_queue_drain(stack: Stack, limit_s: float = 60) -> float:
    """The worker skips each cancelled job's message; wait for the list to empty so the
    next case starts with the echo device idle."""
    t0 = time.perf_counter()
    while stack.redis.llen(device_queue(IDLE_DEVICE)) and time.perf_counter() - t0 < limit_s:
        time.sleep(0.25)
    return time.perf_counter() - t0


async def warm_web(stack: Stack) -> None:
    """Import and connect everything on the streaming path once before the baseline RSS."""
    probe = StreamProbe(-1)
    probe.task = asyncio.create_task(
        hold_stream(probe, stack.port, stream_request(stack.port, stack.api_key, "warm #0"), None)
    )
    await wait_for_first_events([probe], 30)
    await close_streams([probe])
    await asyncio.sleep(1.5)  # the web thread notices the disconnect and cancels


async def hold_idle_streams(stack: Stack, threads: int, extra: int, hold_s: float) -> dict:
    """Open `threads` streams, then `extra` more, hold, close, and measure the web worker."""
    tag = f"idle t{threads}"
    await warm_web(stack)
    before = web_memory(stack)
    base = [StreamProbe(i) for i in range(threads)]
    more = [StreamProbe(threads + i) for i in range(extra)]
    slots = asyncio.Semaphore(OPEN_CONCURRENCY)
    for probe in base:
        request = stream_request(stack.port, stack.api_key, f"{tag} #{probe.index}")
        probe.task = asyncio.create_task(hold_stream(probe, stack.port, request, slots))
    await wait_for_first_events(base, limit_s=180)
    served_first = sum(p.served for p in base)
    open_s = max((p.first_event_at for p in base if p.served), default=0.0) - min(p.started for p in base if p.started)
    say(f"  {served_first}/{threads} streams served in {open_s:.1f} s; opening {extra} more")
    for probe in more:
        request = stream_request(stack.port, stack.api_key, f"{tag} #{probe.index}")
        probe.task = asyncio.create_task(hold_stream(probe, stack.port, request, None))
    web_cpu = await web_cpu_share(stack, hold_s)
    holding = web_memory(stack) | {"worker_cpu_share_while_holding": web_cpu}
    probes = base + more
    served = [p for p in probes if p.served]  # during the hold; the waiting ones may be served later
    waiting = [p for p in probes if p.first_event_at is None and p.error is None]
    say(f"  holding {len(served)} served streams, {len(waiting)} waiting; closing the served ones")
    closed_at = time.perf_counter()
    await close_streams(served)
    # Every waiting stream gets a thread once enough served ones have gone, but that can
    # pause for longer than STALL_S while the freed threads cancel their jobs (SQLite's
    # write lock): wait the whole minute rather than close them early and call it an error.
    await wait_for_first_events(waiting, limit_s=60, stall_s=60)
    late = [p.first_event_at - closed_at for p in waiting if p.first_event_at is not None]
    await close_streams(waiting)
    with_job = sum(p.status == 200 for p in probes)  # each 200 means the view created a job
    statuses, ended_s = await asyncio.to_thread(wait_until_ended, stack, tag, with_job)
    drain_s = await asyncio.to_thread(wait_for_queue_drain, stack)
    memory = {"before": before, "holding": holding, "after_close": web_memory(stack)}
    report = idle_case_report(threads, extra, hold_s, open_s, base, probes, served, late, memory)
    noticed = cancel_latencies(stack, tag, probes)
    return report | {
        "cancelled_after_close_s": spread(noticed),
        "cancelled_later_than_2s": sum(1 for s in noticed if s > 2),
        "jobs_by_status": dict(statuses),
        "jobs_cancelled": statuses["cancelled"],
        "jobs_expected": with_job,
        "cancel_wait_s": round(ended_s, 2),
        "queue_drain_s": round(drain_s, 2),
    }


def idle_case_report(
    threads: int,
    extra: int,
    hold_s: float,
    open_s: float,
    base: list[StreamProbe],
    probes: list[StreamProbe],
    served: list[StreamProbe],
    late: list[float],
    memory: dict[str, dict],
) -> dict:
    """One thread count's numbers; `served` is who had its first event during the hold."""
    errors = [p.error for p in probes if p.error]
    before, holding = memory["before"], memory["holding"]
    grown = holding.get("worker_rss_mib", 0) - before.get("worker_rss_mib", 0)
    grown_uss = holding.get("worker_uss_mib", 0) - before.get("worker_uss_mib", 0)
    return {
        "web": f"gunicorn gthread 1 worker x {threads} threads",
        "threads": threads,
        "streams_opened": len(probes),
        "extra_streams": extra,
        "hold_s": hold_s,
        "served_during_hold": len(served),
        "served_of_first_threads": len({p.index for p in base} & {p.index for p in served}),
        "open_first_threads_s": round(open_s, 2),
        "first_event_ms": spread([p.first_event_at - p.started for p in served], 1000),
        "waiting_during_hold": len(probes) - len(served) - len(errors),
        "waiting_served_after_close": len(late),
        "waiting_first_event_after_close_s": spread(late),
        "errors": len(errors),
        "error_samples": errors[:5],
        "server_closed_during_hold": sum(p.server_closed for p in served),
        "memory_before": before,
        "memory_holding": holding,
        "memory_after_close": memory["after_close"],
        "worker_rss_per_served_stream_kib": round(1024 * grown / max(1, len(served)), 1),
        "worker_uss_per_served_stream_kib": round(1024 * grown_uss / max(1, len(served)), 1),
    }


def measure_idle_streams(stack: Stack, thread_counts: list[int], extra: int, hold_s: float) -> list[dict]:
    cases = []
    for threads in thread_counts:
        stack.restart_web(1, threads)
        say(f"idle streams: 1 web worker x {threads} threads, {threads} + {extra} streams")
        with CpuMeter(stack) as meter:
            case = asyncio.run(hold_idle_streams(stack, threads, extra, hold_s))
        case["other_cpu_share"] = round(meter.foreign_share, 3)
        say(
            f"  web worker RSS {case['memory_before'].get('worker_rss_mib')} -> "
            f"{case['memory_holding'].get('worker_rss_mib')} MiB; "
            f"{case['jobs_cancelled']}/{case['jobs_expected']} jobs cancelled"
        )
        cases.append(case)
    return cases


# ---------------------------------------------------------------- output


def p50_max(s: dict) -> str:
    return f"{s['p50']:.1f} / {s['max']:.1f}" if s.get("n") else "-"


def holding(c: dict, key: str) -> Any:
    """What the web worker measured `key` at while it held the streams."""
    return c["memory_holding"].get(key)


HOLD_COLUMNS = [
    ("threads", lambda c: str(c["threads"])),
    ("streams", lambda c: str(c["streams_opened"])),
    ("served", lambda c: str(c["served_during_hold"])),
    ("open s", lambda c: f"{c['open_first_threads_s']:.1f}"),
    (
        "worker RSS MiB before/holding",
        lambda c: f"{c['memory_before'].get('worker_rss_mib', 0):.0f} / {holding(c, 'worker_rss_mib') or 0:.0f}",
    ),
    (
        "KiB/stream RSS (USS)",
        lambda c: f"{c['worker_rss_per_served_stream_kib']:.0f} ({c['worker_uss_per_served_stream_kib']:.0f})",
    ),
    ("web CPU %", lambda c: fmt_share(holding(c, "worker_cpu_share_while_holding")).rstrip("%")),
    (
        "threads/fds/max fd",
        lambda c: f"{holding(c, 'worker_threads')}/{holding(c, 'worker_fds')}/{holding(c, 'worker_max_fd')}",
    ),
    ("redis conns", lambda c: str(holding(c, "redis_connected_clients"))),
    ("errors", lambda c: str(c["errors"])),
]
CLOSE_COLUMNS = [
    ("threads", lambda c: str(c["threads"])),
    ("waiting", lambda c: str(c["waiting_during_hold"])),
    (
        "waiting served, s after close p50/max",
        lambda c: f"{c['waiting_served_after_close']} ({p50_max(c['waiting_first_event_after_close_s'])})",
    ),
    ("job ended, s after its client closed p50/max", lambda c: p50_max(c["cancelled_after_close_s"])),
    ("> 2 s", lambda c: str(c["cancelled_later_than_2s"])),
    ("cancelled", lambda c: f"{c['jobs_cancelled']}/{c['jobs_expected']}"),
]


def print_idle(cases: list[dict]) -> None:
    print(
        "\n2. idle streams on one gunicorn gthread worker (echo, 1 word/s, on its own device: "
        "one job runs, the others wait queued)"
    )
    print_columns(HOLD_COLUMNS, cases)
    masters = ", ".join(f"{c['memory_holding']['master_rss_mib']:.0f}" for c in cases)
    print(f"gunicorn master RSS MiB while holding: {masters} (it only supervises; streams live in the worker)")
    print("\nthen: the served streams closed; the waiting ones get a thread; all closed; jobs checked")
    print_columns(CLOSE_COLUMNS, cases)
