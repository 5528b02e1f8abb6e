"""Part 1 of bench/streaming.py: time to first token and decode speed of a streamed chat
completion through the stack, against the same generation in this process.

Each pair is one `TextGeneration.generate` here (an `emit` that only timestamps) and
one `POST /v1/chat/completions` with `stream: true` through gunicorn and the worker
(`loadgen.stream_once`: a fresh connection, SSE events timed as they come off the
socket, tokens from the usage chunk), never both at once. A pair during which other
processes took more than CONTAMINATED_SHARE of the machine is set aside and re-run.
Each server run is split into stages on one wall clock: the job row's
created_at/started_at and the Redis stream entry ids (when each token's XADD landed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from cpu import CpuMeter, wait_for_quiet
from internals import JOB_TABLE, as_epoch, job_key, job_stream_key
from loadgen import Load, call_once, stream_once
from report import fmt_ratio, fmt_share, percentile, print_table, say, spread
from stack import Stack

# isort: split
# After `stack`, which puts the project root on sys.path.
from algorithms.base import GenerationRequest
from algorithms.loader import build_algorithm

GEN_MODEL = "smollm2"
GEN_ALGORITHM = "algorithms.transformers_lm:TextGeneration"
GEN_DEVICE = "cpu"
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle after a storm."
REQUEST_TIMEOUT_S = 120
CONTAMINATED_SHARE = 0.10  # of the machine's CPU, taken by processes outside this benchmark


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


def chat_load(stack: Stack, max_tokens: int) -> Load:
    body = {
        "model": GEN_MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
    return Load("/v1/chat/completions", headers, json.dumps(body).encode(), stream=True)


def run_streamed(stack: Stack, max_tokens: int) -> GenRun:
    """One `stream: true` chat completion over a fresh connection, timed per SSE event."""
    load = chat_load(stack, max_tokens)
    with CpuMeter(stack) as meter:
        sent_wall = time.time()
        reply = stream_once(stack.port, load, REQUEST_TIMEOUT_S)
    streamed = reply.streamed
    tokens = int(streamed.usage.get("completion_tokens", 0))
    run = GenRun(
        ttft_s=streamed.first_s if streamed.first_s is not None else float("nan"),
        decode_tokens_per_s=decode_rate(tokens, streamed.first_s, streamed.last_s),
        total_s=reply.total_s,
        completion_tokens=tokens,
        finish_reason=streamed.finish_reason,
        text=streamed.text,
        other_cpu_share=meter.foreign_share,
        headers_s=reply.headers_s,
        job_id=reply.headers.get("X-Request-Id"),
    )
    if streamed.first_s is not None and run.job_id:
        run.stages_ms = server_stages(stack, run.job_id, sent_wall, sent_wall + streamed.first_s, tokens)
    return run


def server_stages(stack: Stack, job_id: str, sent_wall: float, first_wall: float, tokens: int) -> dict[str, float]:
    """Where the server's time to first token goes, on one wall clock (same machine):
    the job row's created_at / started_at and the Redis stream entry ids, which are the
    milliseconds at which the worker's XADD of each token landed."""
    key = job_key(job_id, stack.database)
    rows = stack.query(f"SELECT created_at, started_at FROM {JOB_TABLE} WHERE id = {{p}}", [key])
    entries = stack.redis.xrange(job_stream_key(job_id))
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
    body = json.dumps({"model": GEN_MODEL, "messages": [{"role": "user", "content": PROMPT}]}).encode()
    headers = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
    for _ in range(requests):
        status, _answer = call_once(stack.port, "POST", "/v1/tokenize", body, headers)
        if status != 200:
            raise RuntimeError(f"warm-up /v1/tokenize: HTTP {status}")


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


def summarise_runs(runs: list[GenRun]) -> dict:
    return {
        "ttft_ms": spread([r.ttft_s for r in runs], 1000),
        "decode_tokens_per_s": spread([r.decode_tokens_per_s for r in runs]),
        "total_s": spread([r.total_s for r in runs]),
        "headers_ms": spread([r.headers_s for r in runs], 1000),
        "completion_tokens": sorted({r.completion_tokens for r in runs}),
        "finish_reasons": dict(Counter(r.finish_reason for r in runs)),
        "other_cpu_share_max": max((r.other_cpu_share for r in runs), default=float("nan")),
    }


def stage_medians(runs: list[GenRun]) -> dict:
    names = dict.fromkeys(name for r in runs for name in r.stages_ms)
    return {name: percentile(sorted(r.stages_ms[name] for r in runs if name in r.stages_ms), 50) for name in names}


# ---------------------------------------------------------------- output


def fmt_spread(s: dict, digits: int = 0) -> str:
    if not s.get("n"):
        return "-"
    return f"{s['p50']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def run_row(name: str, s: dict) -> list[str]:
    return [
        name,
        fmt_spread(s["ttft_ms"]),
        fmt_spread(s["decode_tokens_per_s"], 1),
        f"{s['total_s'].get('p50', float('nan')):.2f}",
        ",".join(map(str, s["completion_tokens"])),
        ",".join(f"{k} {v}" for k, v in s["finish_reasons"].items()),
    ]


def ratio_rows(local: dict, remote: dict, pairs: dict) -> list[list[str]]:
    keys = ("ttft_ms", "decode_tokens_per_s", "total_s")
    p50 = [fmt_ratio(remote[key].get("p50"), local[key].get("p50")) for key in keys]
    of_pairs = [f"{pairs[key]:.2f}x" for key in ("ttft", "decode_tokens_per_s", "total_s")]
    return [["server p50 / in-process p50", *p50, "", ""], ["server / in-process, p50 of pairs", *of_pairs, "", ""]]


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
    rows = [run_row("in-process generate()", local), run_row("POST /v1/chat/completions stream", remote)]
    rows += ratio_rows(local, remote, gen["pair_ratio_p50"])
    print_table(["", "TTFT ms p50 (min-max)", "decode tok/s p50 (min-max)", "total s p50", "tokens", "finish"], rows)
    stages = gen["server"]["stages_ms_p50"]
    if stages:
        print("server TTFT by stage, p50 ms: " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    print(
        f"same text as in-process: {gen['same_text_as_in_process']}; other processes' CPU share, max: "
        f"in-process {fmt_share(local['other_cpu_share_max'])}, server {fmt_share(remote['other_cpu_share_max'])}; "
        f"pairs set aside as contaminated (> {100 * CONTAMINATED_SHARE:.0f}%): {len(gen['pairs_set_aside'])}"
    )
