"""Streamed chat completions: time to first token and decode speed through the real stack
against in-process generation, and how many idle streams one web process holds.

Starts its own stack in a temporary data dir (as bench/roundtrip.py does: embedded Redis,
SQLite or PostgreSQL, gunicorn gthread) with two devices, each with its own worker:

  `cpu`    SmolLM2-135M-Instruct (`algorithms.transformers_lm:TextGeneration`)
  `cpu:1`  `algorithms.echo:Echo` streaming one word a second forever (the idle-stream load)

and measures in ONE run:

  1. TTFT and decode tokens/s of `POST /v1/chat/completions` with `stream: true` (raw
     http.client reading the SSE stream, tokens from the usage chunk) against
     `TextGeneration.generate` in this process (same model dir, dtype, prompt,
     max_tokens, temperature 0, torch's default thread count in both). The two alternate,
     one at a time (this machine has 2 cores), after a warm-up of each; a pair during
     which other processes took over a tenth of the CPU is set aside and re-run. Each
     server run is split into stages from its job row and the Redis stream's entry ids.
  2. Idle streams: gunicorn restarted with ONE worker process and T threads (e.g. 32,
     256, 1024); T streams opened on the echo model (one job runs, the rest wait queued:
     a client holding a connection and a web thread), then a few more than T; all held
     a few seconds while the web worker's RSS, CPU, threads and fds are read; then closed,
     and each job checked to have been cancelled, and how long after its client left.

Prints two tables, writes `bench/results/streaming.json`. Every process it starts is
stopped on exit, error or Ctrl-C.

    .venv/bin/python bench/streaming.py [--reps 5] [--max-tokens 64] [--threads 32,256,1024]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from common import (
    RESULTS_DIR,
    ROOT,
    CpuMeter,
    Stack,
    as_epoch,
    child_pids,
    deployment_toml,
    device_queue,
    install_signal_handlers,
    machine_info,
    no_nan,
    percentile,
    print_table,
    proc_cpu_s,
    redact,
    run_on_stack,
    say,
    server_toml,
    wait_for_quiet,
)

# isort: split
# After `common`, which puts the project root on sys.path.
from algorithms.base import GenerationRequest
from algorithms.loader import build_algorithm
from algorithms.prepare import is_prepared, prepare_model

GEN_MODEL = "smollm2"
GEN_ALGORITHM = "algorithms.transformers_lm:TextGeneration"
GEN_DEVICE = "cpu"
GEN_MODEL_DIR = "smollm2-135m-instruct"
IDLE_MODEL = "idle-echo"
IDLE_DEVICE = "cpu:1"
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle after a storm."
DEFAULT_MODELS_DIR = Path("/tmp/bench-stream-data/models")
PART1_WEB = (2, 32)  # what `serve` starts by default
OPEN_CONCURRENCY = 64  # streams being set up at once; the rest wait their turn in this client
STALL_S = 5.0  # give up waiting for first events after this long without one arriving
REQUEST_TIMEOUT_S = 120
CONTAMINATED_SHARE = 0.10  # of the machine's CPU, taken by processes outside this benchmark
MIB = 1024 * 1024


# ---------------------------------------------------------------- stack


def bench_config_toml(models_dir: Path, max_tokens: int, dtype: str) -> Callable[[Path, int], str]:
    """The TOML writer the Stack calls with its temp dir and port. The queue depth is
    raised so that a thousand queued idle jobs are not refused with 503 queue_full."""

    def write(tmp: Path, port: int) -> str:
        head = server_toml(
            "streaming.py",
            tmp,
            port,
            web_workers=PART1_WEB[0],
            web_threads=PART1_WEB[1],
            default_model=GEN_MODEL,
            max_queue_depth=100000,
            job_timeout_s=300,
        )
        gen_options = f'model_path = "{models_dir / GEN_MODEL_DIR}", max_new_tokens = {max_tokens}, dtype = "{dtype}"'
        idle_options = "token_delay_ms = 1000, repeat = true, max_new_tokens = 100000"
        return (
            head
            + "\n[worker]\npreload = true\n"
            + deployment_toml(GEN_MODEL, GEN_ALGORITHM, GEN_DEVICE, gen_options)
            + deployment_toml(IDLE_MODEL, "algorithms.echo:Echo", IDLE_DEVICE, idle_options)
        )

    return write


def ensure_model(models_dir: Path) -> Path:
    """The SmolLM2 directory the worker and this process load; converted once (~30 s)."""
    path = models_dir / GEN_MODEL_DIR
    if not is_prepared(path):
        say(f"preparing {GEN_MODEL_DIR} in {models_dir} (once, ~30 s)")
        prepare_model(GEN_MODEL_DIR, models_dir, progress=say)
    return path


def raise_fd_limit() -> tuple[int, int]:
    """A thousand streams need a few thousand sockets here and in the children (which
    inherit the limit): raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ---------------------------------------------------------------- part 1: TTFT and decode speed


@dataclass
class GenRun:
    """One generation, timed from the caller's side (seconds)."""

    ttft_s: float  # call / request sent -> first non-empty text
    decode_tokens_per_s: float  # (tokens - 1) / (last text - first text)
    total_s: float  # call -> return / request -> [DONE]
    completion_tokens: int
    finish_reason: str
    text: str
    other_cpu_share: float  # machine CPU used by processes outside this benchmark meanwhile
    headers_s: float | None = None  # server only: request -> status line and headers
    job_id: str | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)


def decode_rate(tokens: int, first_s: float | None, last_s: float | None) -> float:
    if first_s is None or last_s is None or tokens < 2 or last_s <= first_s:
        return float("nan")
    return (tokens - 1) / (last_s - first_s)


def load_in_process(model_dir: Path, max_tokens: int, dtype: str) -> Any:
    """The same constructor and options the worker's deployment gets."""
    options = {"model_path": str(model_dir), "max_new_tokens": max_tokens, "dtype": dtype}
    return build_algorithm(GEN_ALGORITHM, GEN_DEVICE, options)


def run_in_process(algorithm: Any, max_tokens: int, stack: Stack) -> GenRun:
    """`generate` with an emit that only timestamps: what a caller in the worker sees."""
    times: list[float] = []

    def emit(text: str) -> bool:
        if text:
            times.append(time.perf_counter())
        return True

    request = GenerationRequest(max_tokens=max_tokens, messages=({"role": "user", "content": PROMPT},), temperature=0.0)
    with CpuMeter(stack) as meter:
        t0 = time.perf_counter()
        completion = algorithm.generate(request, emit)
        total = time.perf_counter() - t0
    first, last = (times[0], times[-1]) if times else (None, None)
    return GenRun(
        ttft_s=(first - t0) if first else float("nan"),
        decode_tokens_per_s=decode_rate(completion.completion_tokens, first, last),
        total_s=total,
        completion_tokens=completion.completion_tokens,
        finish_reason=completion.finish_reason,
        text=completion.text,
        other_cpu_share=meter.foreign_share,
    )


def sse_events(response: http.client.HTTPResponse) -> Iterator[tuple[float, bytes]]:
    """(arrival time, raw event) as bytes come off the socket: `read1` returns what has
    arrived (de-chunked) without waiting for more, so the timestamps are the arrivals."""
    buffer = b""
    while chunk := response.read1(65536):
        now = time.perf_counter()
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            yield now, event


def run_streamed(stack: Stack, max_tokens: int) -> GenRun:
    """One `stream: true` chat completion over a fresh connection, timed per SSE event."""
    body = {
        "model": GEN_MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=REQUEST_TIMEOUT_S)
    first = last = None
    pieces: list[str] = []
    usage: dict = {}
    finish = ""
    try:
        with CpuMeter(stack) as meter:
            sent_wall, t0 = time.time(), time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
            response = conn.getresponse()
            headers_at = time.perf_counter()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
            job_id = response.getheader("X-Request-Id")
            for arrived, event in sse_events(response):
                data = event.removeprefix(b"data: ")
                if event.startswith(b":") or data == b"[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"error event: {chunk['error']}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    finish = choice.get("finish_reason") or finish
                    if text := choice.get("delta", {}).get("content"):
                        first = first or arrived
                        last = arrived
                        pieces.append(text)
            total = time.perf_counter() - t0
    finally:
        conn.close()
    tokens = int(usage.get("completion_tokens", 0))
    run = GenRun(
        ttft_s=(first - t0) if first else float("nan"),
        decode_tokens_per_s=decode_rate(tokens, first, last),
        total_s=total,
        completion_tokens=tokens,
        finish_reason=finish,
        text="".join(pieces),
        other_cpu_share=meter.foreign_share,
        headers_s=headers_at - t0,
        job_id=job_id,
    )
    if first is not None and job_id:
        run.stages_ms = server_stages(stack, job_id, sent_wall, sent_wall + (first - t0), tokens)
    return run


def server_stages(stack: Stack, job_id: str, sent_wall: float, first_wall: float, tokens: int) -> dict[str, float]:
    """Where the server's time to first token goes, on one wall clock (same machine):
    the job row's created_at / started_at and the Redis stream entry ids, which are the
    milliseconds at which the worker's XADD of each token landed."""
    key = uuid.UUID(job_id).hex if stack.database == "sqlite" else job_id
    rows = stack.query("SELECT created_at, started_at FROM llmjobs_job WHERE id = {p}", [key])
    entries = stack.redis.xrange(f"dla:job:{job_id}")
    published = [int(entry_id.split("-")[0]) / 1000 for entry_id, fields in entries if fields.get("event") == "token"]
    if not rows or not published:
        return {}
    created, started = (as_epoch(v) for v in rows[0])
    stages = {
        "request_to_job_row": created - sent_wall,  # connect, HTTP, auth, parse (created_at is set before the INSERT)
        "job_row_to_claimed": started - created,  # INSERT commit, enqueue, Celery hand-off, cancel check, claim UPDATE
        "claimed_to_first_token_published": published[0] - started,  # tokenize, prefill, first step, XADD
        "published_to_client": first_wall - published[0],  # XREAD wake-up, SSE chunk, socket
    }
    out = {name: round(1000 * value, 2) for name, value in stages.items()}
    if len(published) > 1 and published[-1] > published[0]:
        # Token events are one per emit; the worker-side rate uses the same definition.
        out["worker_decode_tokens_per_s"] = round((tokens - 1) / (published[-1] - published[0]), 2)
    return out


def torch_threads_report(stack: Stack) -> dict:
    """Thread settings on both sides: this process's, and what a fresh process started
    like the worker (same environment) gets by default; the worker sets none itself."""
    import torch

    probe = "import torch; print(torch.get_num_threads(), torch.get_num_interop_threads())"
    out = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=120
    ).stdout.split()
    child = stack.celery_child_pids(GEN_DEVICE)
    return {
        "in_process": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()},
        "worker_default": {"intra_op": int(out[0]), "inter_op": int(out[1])} if len(out) == 2 else None,
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS")},
        "worker_child_os_threads": psutil.Process(child[0]).num_threads() if child else None,
    }


def warm_web_workers(stack: Stack, requests: int = 8) -> None:
    """Each gunicorn worker loads the app lazily: its first request costs ~0.3 s here. A
    few cheap calls on fresh connections (the workers take turns at random) first."""
    body = json.dumps({"model": GEN_MODEL, "messages": [{"role": "user", "content": PROMPT}]})
    headers = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
    for _ in range(requests):
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=REQUEST_TIMEOUT_S)
        try:
            conn.request("POST", "/v1/tokenize", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"warm-up /v1/tokenize: HTTP {response.status}")
        finally:
            conn.close()


def run_pair(stack: Stack, algorithm: Any, max_tokens: int, label: str) -> tuple[GenRun, GenRun]:
    """One in-process generation, then one through the server: never both at once."""
    local = run_in_process(algorithm, max_tokens, stack)
    remote = run_streamed(stack, max_tokens)
    say(
        f"{label}: in-process TTFT {1000 * local.ttft_s:.0f} ms, {local.decode_tokens_per_s:.1f} tok/s; "
        f"server TTFT {1000 * remote.ttft_s:.0f} ms, {remote.decode_tokens_per_s:.1f} tok/s; other processes "
        f"{100 * local.other_cpu_share:.0f}% / {100 * remote.other_cpu_share:.0f}% of the CPU"
    )
    return local, remote


def measure_generation(
    stack: Stack, algorithm: Any, reps: int, warmup: int, max_tokens: int, quiet_wait_s: float
) -> dict:
    """Warm-ups, then pairs until `reps` clean ones (or 3 x reps tries). A pair during
    which other processes took more than CONTAMINATED_SHARE of the machine is set aside:
    on 2 cores a busy neighbour stalls torch's threads and ruins both numbers."""
    warm_web_workers(stack)
    for i in range(warmup):
        run_pair(stack, algorithm, max_tokens, f"warm-up {i + 1}/{warmup}")
    kept: list[tuple[GenRun, GenRun]] = []
    set_aside: list[tuple[GenRun, GenRun]] = []
    for attempt in range(3 * reps):
        if len(kept) == reps:
            break
        wait_for_quiet(quiet_wait_s, threshold=CONTAMINATED_SHARE)
        pair = run_pair(stack, algorithm, max_tokens, f"rep {len(kept) + 1}/{reps} (try {attempt + 1})")
        clean = max(pair[0].other_cpu_share, pair[1].other_cpu_share) <= CONTAMINATED_SHARE
        (kept if clean else set_aside).append(pair)
    if not kept:
        say("no pair ran on a quiet machine; reporting the contaminated ones")
        kept, set_aside = set_aside, []
    in_process, server = [a for a, _ in kept], [b for _, b in kept]
    return {
        "in_process": {"summary": summarise_runs(in_process), "runs": [asdict(r) for r in in_process]},
        "server": {
            "summary": summarise_runs(server),
            "stages_ms_p50": stage_medians(server),
            "runs": [asdict(r) for r in server],
        },
        "pair_ratio_p50": pair_ratios(kept),
        "same_text_as_in_process": all(a.text == b.text for a, b in kept),
        "pairs_set_aside": [{"in_process": asdict(a), "server": asdict(b)} for a, b in set_aside],
    }


def pair_ratios(pairs: list[tuple[GenRun, GenRun]]) -> dict:
    """Median of server / in-process per pair: the two ran back to back, so slow drift
    of a shared machine cancels out better than in a ratio of medians."""

    def median(values: list[float]) -> float:
        values = sorted(v for v in values if v == v)
        return round(percentile(values, 50), 3) if values else float("nan")

    return {
        "ttft": median([b.ttft_s / a.ttft_s for a, b in pairs]),
        "decode_tokens_per_s": median([b.decode_tokens_per_s / a.decode_tokens_per_s for a, b in pairs]),
        "total_s": median([b.total_s / a.total_s for a, b in pairs]),
    }


def spread(values: list[float], scale: float = 1.0) -> dict:
    values = sorted(v * scale for v in values if v == v)
    if not values:
        return {"n": 0}
    p50 = percentile(values, 50)
    return {"n": len(values), "p50": round(p50, 3), "min": round(values[0], 3), "max": round(values[-1], 3)}


def summarise_runs(runs: list[GenRun]) -> dict:
    return {
        "ttft_ms": spread([r.ttft_s for r in runs], 1000),
        "decode_tokens_per_s": spread([r.decode_tokens_per_s for r in runs]),
        "total_s": spread([r.total_s for r in runs]),
        "headers_ms": spread([r.headers_s for r in runs if r.headers_s is not None], 1000),
        "completion_tokens": sorted({r.completion_tokens for r in runs}),
        "finish_reasons": dict(Counter(r.finish_reason for r in runs)),
        "other_cpu_share_max": max((r.other_cpu_share for r in runs), default=float("nan")),
    }


def stage_medians(runs: list[GenRun]) -> dict:
    names = dict.fromkeys(name for r in runs for name in r.stages_ms)
    return {name: percentile(sorted(r.stages_ms[name] for r in runs if name in r.stages_ms), 50) for name in names}


# ---------------------------------------------------------------- part 2: idle streams


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
        "SELECT status, COUNT(*) FROM llmjobs_job WHERE input_text LIKE {p} GROUP BY status", [f"user: {tag} #%"]
    )
    return Counter({status: count for status, count in rows})


def cancel_latencies(stack: Stack, tag: str, probes: list[StreamProbe]) -> list[float]:
    """Seconds from each client's close to its job's finished_at: the web thread noticed
    and cancelled the job, or the worker recorded the cancellation at its next word."""
    closed = {uuid.UUID(p.job_id).hex: p.closed_wall for p in probes if p.job_id and p.closed_wall}
    rows = stack.query("SELECT id, finished_at FROM llmjobs_job WHERE input_text LIKE {p}", [f"user: {tag} #%"])
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


def fmt_spread(s: dict, digits: int = 0) -> str:
    if not s.get("n"):
        return "-"
    return f"{s['p50']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def ratio(a: float, b: float) -> str:
    return "-" if not b or a != a or b != b else f"{a / b:.2f}x"


def run_row(name: str, s: dict) -> list[str]:
    return [
        name,
        fmt_spread(s["ttft_ms"]),
        fmt_spread(s["decode_tokens_per_s"], 1),
        f"{s['total_s'].get('p50', float('nan')):.2f}",
        ",".join(map(str, s["completion_tokens"])),
        ",".join(f"{k} {v}" for k, v in s["finish_reasons"].items()),
    ]


def ratio_row(local: dict, remote: dict) -> list[str]:
    keys = ("ttft_ms", "decode_tokens_per_s", "total_s")
    p50 = {key: (remote[key].get("p50", float("nan")), local[key].get("p50", float("nan"))) for key in keys}
    return [
        "server p50 / in-process p50",
        ratio(*p50["ttft_ms"]),
        ratio(*p50["decode_tokens_per_s"]),
        ratio(*p50["total_s"]),
        "",
        "",
    ]


def print_generation(gen: dict, setup: dict) -> None:
    local, remote = gen["in_process"]["summary"], gen["server"]["summary"]
    threads = setup["torch_threads"]
    worker = threads["worker_default"] or {}
    print(
        f"\n1. streamed chat: SmolLM2-135M-Instruct ({setup['dtype']}), max_tokens {setup['max_tokens']}, "
        f"temperature 0, {setup['reps']} reps after {setup['warmup']} warm-up; torch threads intra/inter: "
        f"in-process {threads['in_process']['intra_op']}/{threads['in_process']['inter_op']}, "
        f"worker (default) {worker.get('intra_op')}/{worker.get('inter_op')}"
    )
    pairs = gen["pair_ratio_p50"]
    rows = [
        run_row("in-process generate()", local),
        run_row("POST /v1/chat/completions stream", remote),
        ratio_row(local, remote),
        [
            "server / in-process, p50 of pairs",
            f"{pairs['ttft']:.2f}x",
            f"{pairs['decode_tokens_per_s']:.2f}x",
            f"{pairs['total_s']:.2f}x",
            "",
            "",
        ],
    ]
    print_table(["", "TTFT ms p50 (min-max)", "decode tok/s p50 (min-max)", "total s p50", "tokens", "finish"], rows)
    stages = gen["server"]["stages_ms_p50"]
    if stages:
        print("server TTFT by stage, p50 ms: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    print(
        f"same text as in-process: {gen['same_text_as_in_process']}; other processes' CPU share, max: "
        f"in-process {100 * local['other_cpu_share_max']:.0f}%, server {100 * remote['other_cpu_share_max']:.0f}%; "
        f"pairs set aside as contaminated (> {100 * CONTAMINATED_SHARE:.0f}%): {len(gen['pairs_set_aside'])}"
    )


def p50_max(s: dict) -> str:
    return f"{s['p50']:.1f} / {s['max']:.1f}" if s.get("n") else "-"


def print_idle(cases: list[dict]) -> None:
    print(
        "\n2. idle streams on one gunicorn gthread worker (echo, 1 word/s, on its own device: "
        "one job runs, the others wait queued)"
    )
    header = [
        "threads",
        "streams",
        "served",
        "open s",
        "worker RSS MiB before/holding",
        "KiB/stream RSS (USS)",
        "web CPU %",
        "threads/fds/max fd",
        "redis conns",
        "errors",
    ]
    rows = []
    for c in cases:
        b, h = c["memory_before"], c["memory_holding"]
        rows.append(
            [
                str(c["threads"]),
                str(c["streams_opened"]),
                str(c["served_during_hold"]),
                f"{c['open_first_threads_s']:.1f}",
                f"{b.get('worker_rss_mib', 0):.0f} / {h.get('worker_rss_mib', 0):.0f}",
                f"{c['worker_rss_per_served_stream_kib']:.0f} ({c['worker_uss_per_served_stream_kib']:.0f})",
                f"{100 * h.get('worker_cpu_share_while_holding', float('nan')):.0f}",
                f"{h.get('worker_threads')}/{h.get('worker_fds')}/{h.get('worker_max_fd')}",
                str(h.get("redis_connected_clients")),
                str(c["errors"]),
            ]
        )
    print_table(header, rows)
    masters = ", ".join(f"{c['memory_holding']['master_rss_mib']:.0f}" for c in cases)
    print(f"gunicorn master RSS MiB while holding: {masters} (it only supervises; streams live in the worker)")
    print("\nthen: the served streams closed; the waiting ones get a thread; all closed; jobs checked")
    header = [
        "threads",
        "waiting",
        "waiting served, s after close p50/max",
        "job ended, s after its client closed p50/max",
        "> 2 s",
        "cancelled",
    ]
    rows = [
        [
            str(c["threads"]),
            str(c["waiting_during_hold"]),
            f"{c['waiting_served_after_close']} ({p50_max(c['waiting_first_event_after_close_s'])})",
            p50_max(c["cancelled_after_close_s"]),
            str(c["cancelled_later_than_2s"]),
            f"{c['jobs_cancelled']}/{c['jobs_expected']}",
        ]
        for c in cases
    ]
    print_table(header, rows)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="measured generations per side (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured generations per side first (default 1)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each generation (default 64)")
    parser.add_argument("--dtype", default="auto", help="the deployment's dtype option (default auto)")
    parser.add_argument("--threads", default="32,256,1024", help="web_threads values for part 2 (default 32,256,1024)")
    parser.add_argument("--extra-streams", type=int, default=16, help="streams beyond the thread count (default 16)")
    parser.add_argument("--hold-s", type=float, default=5.0, help="how long to hold the streams open (default 5)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help=f"default {DEFAULT_MODELS_DIR}")
    parser.add_argument(
        "--quiet-wait", type=float, default=15, help="before each generation pair, wait up to S s for a quiet machine"
    )
    parser.add_argument("--skip-generation", action="store_true", help="only part 2")
    parser.add_argument("--skip-idle", action="store_true", help="only part 1")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp data dir (logs) even on success")
    args = parser.parse_args()
    args.thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    if args.reps < 1 or args.max_tokens < 2 or any(t < 1 for t in args.thread_counts):
        parser.error("--reps and --threads must be positive, --max-tokens at least 2")
    return args


def run(args: argparse.Namespace, stack: Stack, model_dir: Path) -> tuple[dict | None, list[dict], dict]:
    """Both parts against a started stack; (part 1, part 2, setup facts)."""
    setup: dict[str, Any] = {"max_tokens": args.max_tokens, "reps": args.reps, "warmup": args.warmup}
    generation = None
    if not args.skip_generation:
        say("loading the model in this process too")
        algorithm = load_in_process(model_dir, args.max_tokens, args.dtype)
        setup["dtype"] = str(algorithm.dtype).removeprefix("torch.")
        generation = measure_generation(stack, algorithm, args.reps, args.warmup, args.max_tokens, args.quiet_wait)
        setup["torch_threads"] = torch_threads_report(stack)
        del algorithm
    idle = [] if args.skip_idle else measure_idle_streams(stack, args.thread_counts, args.extra_streams, args.hold_s)
    return generation, idle, setup


def main() -> int:
    args = parse_args()
    install_signal_handlers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub, here or in the worker
    fd_limit = raise_fd_limit()
    model_dir = ensure_model(args.models_dir.resolve())
    tmp = Path(tempfile.mkdtemp(prefix="dla-bench-stream-"))
    stack = Stack(
        args.database,
        tmp,
        bench_config_toml(args.models_dir.resolve(), args.max_tokens, args.dtype),
        [GEN_DEVICE, IDLE_DEVICE],
        *PART1_WEB,
    )
    measured, exit_code = run_on_stack(stack, tmp, args.keep_tmp, lambda: run(args, stack, model_dir))
    if measured is None:
        return exit_code
    generation, idle, setup = measured

    if generation:
        print_generation(generation, setup)
    if idle:
        print_idle(idle)
    problems = idle_problems(idle)
    result = {
        "benchmark": "streaming",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(
            ("Django", "djangorestframework", "gunicorn", "celery", "kombu", "redis", "torch", "transformers", "psutil")
        ),
        "config": {
            "database": args.database,
            "database_url": redact(stack.database_url) if stack.database_url else "sqlite (temp data dir)",
            "redis": "embedded (unix socket)" if stack.embedded_redis else redact(stack.redis_url),
            "redis_server_version": stack.redis_server_version,
            "part1_web": f"gunicorn gthread {PART1_WEB[0]} workers x {PART1_WEB[1]} threads",
            "part2_web": "gunicorn gthread 1 worker x T threads "
            "(processes.gunicorn_argv: worker_connections max(1000, 2 x T))",
            "workers": f"manage.py runworker {GEN_DEVICE} (SmolLM2), manage.py runworker {IDLE_DEVICE} (echo)",
            "model_dir": str(model_dir),
            "prompt": PROMPT,
            "thread_counts": args.thread_counts,
            "extra_streams": args.extra_streams,
            "hold_s": args.hold_s,
            "open_concurrency": OPEN_CONCURRENCY,
            "nofile_limit": list(fd_limit),
            "toml": stack.config_text,
            **setup,
        },
        "generation": generation,
        "idle_streams": idle,
        "problems": problems,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "streaming.json"
    out.write_text(json.dumps(no_nan(result), indent=2, default=str) + "\n")
    print(f"\nwrote {out.relative_to(ROOT)}")
    for line in problems:
        print(f"!!! {line}")
    return 1 if problems else 0


def idle_problems(cases: list[dict]) -> list[str]:
    """What makes part 2's numbers suspect: errors, or jobs left uncancelled."""
    problems = []
    for c in cases:
        if c["errors"]:
            problems.append(f"{c['threads']} threads: {c['errors']} stream errors, e.g. {c['error_samples'][:2]}")
        if c["jobs_cancelled"] != c["jobs_expected"]:
            problems.append(f"{c['threads']} threads: jobs {c['jobs_by_status']}, expected all cancelled")
    return problems


if __name__ == "__main__":
    sys.exit(main())
