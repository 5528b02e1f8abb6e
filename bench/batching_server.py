"""The server cases of bench/batching.py: streamed chats, the late joiner, embeddings.

Every call goes through the whole stack (gunicorn, the job row, the Celery queue, the
device worker's batch, the Redis stream back). Chats: `POST /v1/chat/completions` with
`stream: true`, usage included, temperature 0, each call its own prompt (`story_prompt`:
a long story, so the answers run to `max_tokens` rather than stop early), from a
`loadgen.Pool` of N clients each making `rounds` calls one after another. Tokens/s is
the completion tokens of the usage chunks over the run's wall time; TTFT is the time to
the first content chunk; latency is the request to `[DONE]`. After each case its job
rows are read back (by X-Request-Id): the most jobs each shared a step with
(`batch_size`), its device-seconds and its wait in the queue.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass

from cpu import CpuMeter
from internals import JOB_TABLE, as_epoch, job_key, job_stream_key
from loadgen import CallError, Load, Pool, Reply, call_once, run_in_threads, stream_once
from report import case_summary, latency_summary, rounded, say, spread
from stack import Stack

REQUEST_TIMEOUT_S = 600  # a queued chat on a one-at-a-time deployment waits for all before it
DECODING_TIMEOUT_S = 120
TOPICS = (
    "a lighthouse keeper who finds a message in a bottle",
    "a clockmaker who can repair time itself",
    "a fox who runs a bakery in a snowy village",
    "two astronauts stranded on a quiet moon",
    "a librarian who guards a book nobody can finish",
    "a river that flows uphill once a year",
    "a robot learning to paint sunsets",
    "a sailor who maps islands that move",
    "a girl who trades stories with the wind",
    "an old train that still runs at midnight",
    "a gardener growing a forest on a rooftop",
    "a detective who solves crimes in dreams",
    "a mountain town where it never stops raining",
    "a violinist whose music changes the weather",
    "a cartographer of underground caves",
    "a cat who becomes mayor of a harbour city",
)


def story_prompt(index: int) -> str:
    """Call `index`'s own prompt: a long story, so the answer runs its full length."""
    return f"Write a long story about {TOPICS[index % len(TOPICS)]} (story number {index + 1})."


def auth_headers(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}


def chat_body(model: str, index: int, max_tokens: int) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": story_prompt(index)}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return json.dumps(body).encode()


@dataclass
class Answer:
    """What one streamed chat gave, as its check saw it."""

    tokens: int
    finish_reason: str
    job_id: str | None
    first_s: float | None
    done_s: float | None


class Answers:
    """The check of a chat load, which also keeps each answer (by call index): the
    load generator's timings hold no token counts or job ids."""

    def __init__(self) -> None:
        self.by_index: dict[int, Answer] = {}

    def check(self, index: int, reply: Reply) -> None:
        streamed = reply.streamed
        tokens = int(streamed.usage.get("completion_tokens") or 0)
        if not tokens or not streamed.text:
            raise CallError("empty answer", f"usage {streamed.usage}, text {streamed.text[:100]!r}")
        job_id = reply.headers.get("X-Request-Id")
        self.by_index[index] = Answer(tokens, streamed.finish_reason, job_id, streamed.first_s, streamed.done_s)

    def tokens(self) -> list[int]:
        return [a.tokens for a in self.by_index.values()]

    def job_ids(self) -> list[str]:
        return [a.job_id for a in self.by_index.values() if a.job_id]


def chat_load(stack: Stack, model: str, max_tokens: int, answers: Answers, offset: int = 0) -> Load:
    """Call i streams story `offset + i`: a distinct prompt for every call of a case."""
    return Load(
        "/v1/chat/completions",
        auth_headers(stack),
        lambda index: chat_body(model, offset + index, max_tokens),
        stream=True,
        check=answers.check,
    )


def measure_chat(stack: Stack, model: str, max_batch: int, clients: int, rounds: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, `rounds` streamed chats each, on deployment `model`."""
    answers = Answers()
    load = chat_load(stack, model, max_tokens, answers)
    with Pool(stack.port, clients, REQUEST_TIMEOUT_S) as pool, CpuMeter(stack) as meter:
        outcome = pool.run(load, clients * rounds)
    case = case_summary(f"{model}, {clients} client{'s' if clients > 1 else ''}", outcome)
    tokens = answers.tokens()
    case |= {
        "model": model,
        "max_batch": max_batch,
        "clients": clients,
        "rounds": rounds,
        "ttft": case.pop("first_chunk"),
        "completion_tokens_total": sum(tokens),
        "completion_tokens_mean": rounded(sum(tokens) / len(tokens)) if tokens else None,
        "completion_tokens_min": min(tokens, default=None),
        "finish_reasons": sorted({a.finish_reason for a in answers.by_index.values()}),
        "tokens_per_s": rounded(sum(tokens) / outcome.wall_s) if outcome.wall_s > 0 and tokens else None,
        "jobs": job_rows_summary(stack, answers.job_ids()),
        "other_processes_cpu_share": round(meter.foreign_share, 3),
    }
    say(
        f"{case['case']}: {case['tokens_per_s'] or 0:.1f} tok/s, TTFT p50 {case['ttft']['p50_ms']:.0f} ms, "
        f"latency p50 {case['p50_ms']:.0f} ms, {case['errors']} errors {case['error_samples'][:1]}"
    )
    return case


def job_rows_summary(stack: Stack, job_ids: list[str]) -> dict:
    """From the cases' job rows: the batch each shared (its `batch_size`, the most jobs
    in one step with it), device-seconds, queue wait and run time."""
    if not job_ids:
        return {"n": 0}
    keys = [job_key(job_id, stack.database) for job_id in job_ids]
    marks = ", ".join("{p}" for _ in keys)
    rows = stack.query(
        f"SELECT created_at, started_at, finished_at, device_s, batch_size FROM {JOB_TABLE} WHERE id IN ({marks})",
        keys,
    )
    times = [[as_epoch(v) for v in row[:3]] for row in rows]
    return {
        "n": len(rows),
        "batch_size": spread([row[4] for row in rows], stats=("p50", "min", "max", "mean")),
        "device_s": spread([row[3] for row in rows], stats=("p50", "min", "max", "mean")),
        "queue_wait_ms": spread([s - c for c, s, _f in times if c and s], 1000, ("p50", "max")),
        "run_ms": spread([f - s for _c, s, f in times if s and f], 1000, ("p50", "max")),
    }


# ---------------------------------------------------------------- the late joiner


@dataclass
class Timed:
    """One streamed call on its own connection, on this process's perf_counter clock."""

    sent: float
    reply: Reply | None = None
    error: str = ""

    def at(self, offset_s: float | None) -> float | None:
        return None if offset_s is None else self.sent + offset_s


def stream_timed(stack: Stack, body: bytes) -> Timed:
    """One streamed chat on a fresh connection, its send time kept so that its events can
    be set against other calls'; a failure is kept as text, not raised (it runs in a thread)."""
    load = Load("/v1/chat/completions", auth_headers(stack), body, stream=True)
    timed = Timed(time.perf_counter())
    try:
        timed.reply = stream_once(stack.port, load, REQUEST_TIMEOUT_S)
    except (CallError, OSError) as exc:
        timed.error = f"{type(exc).__name__}: {exc}"
    return timed


def measure_late_joiner(stack: Stack, model: str, decoders: int, rounds: int, max_tokens: int) -> dict:
    """`decoders` chats start together; once each has published a token (all decoding),
    one more arrives: its TTFT, and how many were still decoding when it got its first."""
    runs = [late_joiner_round(stack, model, decoders, max_tokens, 1000 * (r + 1)) for r in range(rounds)]
    ok = [run for run in runs if run["joiner_ttft_ms"] is not None]
    return {
        "case": f"{model}: 1 client joining {decoders} decoding",
        "model": model,
        "decoders": decoders,
        "rounds": rounds,
        "errors": sum(len(run["errors"]) for run in runs),
        "joiner_ttft": latency_summary(run["joiner_ttft_ms"] / 1000 for run in ok),
        "still_decoding_min": min((run["still_decoding"] for run in ok), default=None),
        "joiner_batch_size": [run["joiner_batch_size"] for run in runs],
        "runs": runs,
    }


def stream_all(stack: Stack, bodies: list[bytes]) -> list[Timed]:
    """Each body streamed on its own connection, all at once (a thread each)."""
    results: list[Timed] = [Timed(0.0, error="not run")] * len(bodies)

    def one(index: int) -> None:
        results[index] = stream_timed(stack, bodies[index])

    run_in_threads(one, range(len(bodies)))
    return results


def late_joiner_round(stack: Stack, model: str, decoders: int, max_tokens: int, offset: int) -> dict:
    """One round: the decoders started together, the joiner once they all decode."""
    results: list[Timed] = []
    bodies = [chat_body(model, offset + i, max_tokens) for i in range(decoders)]
    background = threading.Thread(target=lambda: results.extend(stream_all(stack, bodies)), daemon=True)
    background.start()
    waited = wait_until_decoding(stack, model, decoders)
    joiner = stream_timed(stack, chat_body(model, offset + decoders, max_tokens))
    while background.is_alive():
        background.join(0.2)
    streamed = joiner.reply.streamed if joiner.reply else None
    first = joiner.at(streamed.first_s) if streamed else None
    done_at = [t.at(t.reply.streamed.done_s) for t in results if t.reply]
    job_id = joiner.reply.headers.get("X-Request-Id") if joiner.reply else None
    jobs = job_rows_summary(stack, [job_id] if job_id else [])
    run = {
        "waited_for_decoding_s": round(waited, 3),
        "joiner_ttft_ms": round(1000 * streamed.first_s, 2) if streamed and streamed.first_s is not None else None,
        "joiner_total_ms": round(1000 * joiner.reply.total_s, 2) if joiner.reply else None,
        "joiner_tokens": int(streamed.usage.get("completion_tokens") or 0) if streamed else 0,
        "joiner_batch_size": jobs.get("batch_size", {}).get("max"),
        "still_decoding": sum(1 for d in done_at if first is not None and d is not None and d > first),
        "errors": [t.error for t in [*results, joiner] if t.error],
    }
    say(
        f"late joiner: TTFT {run['joiner_ttft_ms']} ms with {run['still_decoding']}/{decoders} still decoding "
        f"(waited {waited:.2f} s for them to decode); errors {run['errors'][:1]}"
    )
    return run


def wait_until_decoding(stack: Stack, model: str, count: int) -> float:
    """Until `count` of `model`'s jobs run and each has published a token (read from the
    job rows and their Redis streams); the seconds it took."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < DECODING_TIMEOUT_S:
        rows = stack.query(f"SELECT id FROM {JOB_TABLE} WHERE model = {{p}} AND status = 'running'", [model])
        ids = [str(uuid.UUID(str(row[0]))) for row in rows]
        if sum(1 for job_id in ids if has_token(stack, job_id)) >= count:
            return time.perf_counter() - t0
        time.sleep(0.02)
    raise RuntimeError(f"{count} jobs of {model} not decoding after {DECODING_TIMEOUT_S} s")


def has_token(stack: Stack, job_id: str) -> bool:
    entries = stack.redis.xrange(job_stream_key(job_id), count=4)
    return any(fields.get("event") == "token" for _entry_id, fields in entries)


# ---------------------------------------------------------------- embeddings


def embedding_load(stack: Stack, model: str) -> Load:
    """One distinct input per call, the vector checked."""

    def body(index: int) -> bytes:
        text = f"Sentence {index} is about {TOPICS[index % len(TOPICS)]}."
        return json.dumps({"model": model, "input": text}).encode()

    def check(index: int, reply: Reply) -> None:
        data = json.loads(reply.body).get("data") or []
        if len(data) != 1 or not data[0].get("embedding"):
            raise CallError("bad embedding", reply.body[:200].decode("utf-8", "replace"))

    return Load("/v1/embeddings", auth_headers(stack), body, check=check)


def measure_embeddings(stack: Stack, model: str, max_batch: int, clients: int, requests: int) -> dict:
    """`requests` calls of one input each from `clients` concurrent clients: inputs/s."""
    load = embedding_load(stack, model)
    with Pool(stack.port, clients, REQUEST_TIMEOUT_S) as pool:
        pool.warm_up(load, 2 * clients)
        with CpuMeter(stack) as meter:
            outcome = pool.run(load, requests)
    case = case_summary(f"{model}, {clients} client{'s' if clients > 1 else ''}", outcome)
    case |= {
        "model": model,
        "max_batch": max_batch,
        "clients": clients,
        "inputs_per_s": case["requests_per_s"],
        "other_processes_cpu_share": round(meter.foreign_share, 3),
    }
    say(
        f"{case['case']}: {case['inputs_per_s'] or 0:.1f} inputs/s, p50 {case['p50_ms']:.1f} ms, "
        f"{case['errors']} errors {case['error_samples'][:1]}"
    )
    return case


# ---------------------------------------------------------------- warm-up


def warm_up(stack: Stack, chat_models: list[str], batch: int, embed_model: str) -> None:
    """Both gunicorn workers load the app lazily (~0.3 s on their first request), and a
    model's first forward passes are slow: a few cheap calls on fresh connections, then
    `batch` short chats at once on each chat deployment, then embeddings, unmeasured."""
    body = json.dumps({"model": chat_models[0], "messages": [{"role": "user", "content": "Hi"}]}).encode()
    for _ in range(8):
        status, _answer = call_once(stack.port, "POST", "/v1/tokenize", body, auth_headers(stack))
        if status != 200:
            raise RuntimeError(f"warm-up /v1/tokenize: HTTP {status}")
    for model in chat_models:
        warmed = [stream_timed(stack, chat_body(model, 0, 4))]
        warmed += stream_all(stack, [chat_body(model, i, 4) for i in range(batch)])
        errors = [t.error for t in warmed if t.error]
        if errors:
            raise RuntimeError(f"warm-up chat on {model} failed: {errors[0]}")
    with Pool(stack.port, 4, REQUEST_TIMEOUT_S) as pool:
        outcome = pool.run(embedding_load(stack, embed_model), 16)
    if outcome.error_count:
        raise RuntimeError(f"warm-up embeddings failed: {outcome.error_samples[:1]}")
