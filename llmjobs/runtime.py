"""Worker side: the memoized Algorithm per deployment, and running one job.

Runs only inside a device worker process (`manage.py runworker <device>`), the one
process allowed to touch that device.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import close_old_connections

from algorithms.base import Completion, GenerationRequest, SupportsEmbed, SupportsGenerate, last_user_message
from algorithms.loader import build_algorithm
from llmjobs import events, services
from llmjobs.routing import deployments_on_device, device_queue_name

log = logging.getLogger(__name__)

JOB_FAILED_MESSAGE = "The model failed to process the request."
CANCELLED_MESSAGE = "The job was cancelled: its client went away."
TIME_LIMIT_MESSAGE = "The job ran past its time limit and was stopped."
WORKER_LOST_MESSAGE = "The worker running this job died; the job was not completed."
DEVICE_ENV = "DLA_WORKER_DEVICE"
PRELOAD_ENV = "DLA_WORKER_PRELOAD"


@functools.cache
def get_algorithm(name: str) -> Any:
    """Build a deployment's Algorithm once per process; it keeps its model resident."""
    deployment = settings.LLM_CONFIG.deployment(name)
    if deployment is None:
        raise LookupError(f"no deployment named {name!r}")
    log.info("loading %s (%s) on %s", name, deployment.algorithm, deployment.device)
    return build_algorithm(deployment.algorithm, deployment.device, deployment.options)


def execute_job(job_id: str, model: str, kind: str, payload: Any, worker: str) -> None:
    """Run one job: skip it if cancelled, claim it, run, record, publish. Recording
    first means a client that has its answer finds the job row and refund already done;
    anything failing up to the publish fails the job, so none is left running."""
    close_old_connections()  # a connection broken since the last job is replaced, not reused
    if events.is_cancelled(job_id):
        log.info("job %s skipped: cancelled", job_id)
        return
    if not services.mark_running(job_id, worker):
        fail_abandoned_job(job_id)
        return
    try:
        record_outcome(job_id, run_job_kind(get_algorithm(model), job_id, kind, payload))
    except SoftTimeLimitExceeded:
        log.warning("job %s on %s stopped at its time limit", job_id, model)
        fail_and_notify(job_id, "job_time_limit", TIME_LIMIT_MESSAGE)
    except UnsupportedOperation as exc:
        fail_and_notify(job_id, "unsupported_operation", str(exc))
    except Exception:
        log.exception("job %s on %s failed", job_id, model)
        fail_and_notify(job_id, "job_failed", JOB_FAILED_MESSAGE)


def record_outcome(job_id: str, outcome: Outcome) -> None:
    """Record what the job produced, then tell its client. A job whose client left just
    after its last token (cancelled between that token and this write) keeps the
    tokens it made and is charged exactly them, like any cancelled job."""
    if outcome.cancelled:
        services.record_cancelled(job_id, outcome.prompt_tokens or 0, outcome.completion_tokens or 0)
        events.emit(job_id, "error", code="cancelled", message=CANCELLED_MESSAGE)
        return
    json.dumps(outcome.result)  # it travels and is stored as JSON: refuse anything else here
    finished = services.finish_job(
        job_id, outcome.stored, outcome.prompt_tokens, outcome.completion_tokens, store_output=outcome.store_output
    )
    if not finished:
        services.record_cancelled(job_id, outcome.prompt_tokens or 0, outcome.completion_tokens or 0)
    events.emit(job_id, "done", output=outcome.result)


def fail_abandoned_job(job_id: str) -> None:
    """A job already marked running that reaches a worker again was redelivered because
    the process running it died (killed, out of memory, a CUDA crash). Running it again
    could kill the next process too, so it fails, refunded, and its client is told."""
    if fail_and_notify(job_id, "worker_lost", WORKER_LOST_MESSAGE, only_running=True):
        log.error("job %s was abandoned by a dead worker process; marked failed", job_id)
    else:
        log.info("job %s skipped: no longer queued", job_id)


def fail_and_notify(job_id: str, code: str, message: str, only_running: bool = False) -> bool:
    """Record the failure (refunded) and tell a waiting client; nothing when the job
    had already ended, e.g. its waiting request timed it out first."""
    failed = services.fail_job(job_id, code, message, only_running=only_running)
    if failed:
        events.emit(job_id, "error", code=code, message=message)
    return failed


class UnsupportedOperation(Exception):
    """The deployment's algorithm lacks the method this kind of job needs."""


@dataclass(frozen=True)
class Outcome:
    """What a finished job hands on: `result` to the waiting client (the `done`
    event), `stored` to the Job row, and the token counts the key is charged."""

    result: Any
    stored: Any
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cancelled: bool = False
    store_output: bool = True


def run_job_kind(algorithm: Any, job_id: str, kind: str, payload: Any) -> Outcome:
    handler = JOB_KINDS.get(kind)
    if handler is None:
        raise ValueError(f"unknown job kind {kind!r}")
    return handler(algorithm, job_id, payload)


def run_text(algorithm: Any, job_id: str, text: str) -> Outcome:
    """`POST /api/`: the plug-in's `run`; a text generator also reports its tokens."""
    if callable(getattr(algorithm, "complete", None)):
        completion = algorithm.complete(text)
        return Outcome(completion.text, completion.text, completion.prompt_tokens, completion.completion_tokens)
    output = algorithm.run(text)
    return Outcome(output, output)


def run_generation(algorithm: Any, job_id: str, payload: dict[str, Any]) -> Outcome:
    """Chat and completions: tokens go to the job's stream as they are made (when a
    client streams), and the client's disconnect stops generation at the next token."""
    request = GenerationRequest.from_payload(payload["request"])
    publish = TokenPublisher(job_id, stream=bool(payload.get("stream")))
    if isinstance(algorithm, SupportsGenerate):
        completion = algorithm.generate(request, publish)
    else:
        completion = generate_with_run(algorithm, request, publish)
    result = {
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
    }
    cancelled = completion.finish_reason == "cancelled" or publish.cancelled
    return Outcome(result, result, completion.prompt_tokens, completion.completion_tokens, cancelled)


def generate_with_run(algorithm: Any, request: GenerationRequest, emit: Callable[[str], bool]) -> Completion:
    """A plug-in with only `run` still answers chat: it gets the last user message (or
    the prompt), as `POST /api/` would give it, and its answer comes as one piece.
    Tokens are counted by its `count_tokens` when it has one, else as words."""
    text = request.prompt if request.prompt is not None else last_user_message(request.messages or ())
    output = algorithm.run(text)
    output = output if isinstance(output, str) else json.dumps(output)
    if output:
        emit(output)
    count = token_counter(algorithm)
    return Completion(output, count(text), count(output), "stop")


def token_counter(algorithm: Any) -> Callable[[str], int]:
    """The plug-in's `count_tokens`, or whitespace words when it has none."""
    return getattr(algorithm, "count_tokens", None) or (lambda value: len(value.split()))


def run_embeddings(algorithm: Any, job_id: str, payload: dict[str, Any]) -> Outcome:
    if not isinstance(algorithm, SupportsEmbed):
        raise UnsupportedOperation("This model does not compute embeddings.")
    texts = payload["input"]
    vectors = algorithm.embed(texts)
    tokens = count_input_tokens(algorithm, texts)
    result = {"data": vectors, "prompt_tokens": tokens}
    return Outcome(result, None, tokens, 0, store_output=False)


def count_input_tokens(algorithm: Any, texts: list[str]) -> int:
    batch = getattr(algorithm, "count_tokens_batch", None)
    if callable(batch):
        return int(batch(texts))
    count = token_counter(algorithm)
    return sum(int(count(text)) for text in texts)


def run_tokenize(algorithm: Any, job_id: str, payload: dict[str, Any]) -> Outcome:
    """Token ids of a prompt or chat exactly as generation would feed them. Costs a
    call but no tokens: nothing was generated."""
    request = GenerationRequest.from_payload(payload["request"])
    if callable(getattr(algorithm, "tokenize", None)):
        ids = [int(i) for i in algorithm.tokenize(request)]
        result = {"tokens": ids, "count": len(ids)}
    elif callable(getattr(algorithm, "count_tokens", None)) and request.prompt is not None:
        result = {"tokens": None, "count": int(algorithm.count_tokens(request.prompt))}
    else:
        raise UnsupportedOperation("This model cannot tokenize.")
    return Outcome(result, result["count"])


JOB_KINDS: dict[str, Callable[[Any, str, Any], Outcome]] = {
    "run": run_text,
    "chat": run_generation,
    "completion": run_generation,
    "embeddings": run_embeddings,
    "tokenize": run_tokenize,
}


class TokenPublisher:
    """The `emit` handed to `generate`: appends each piece to the job's stream when a
    client streams, and answers False once the job is cancelled (one Redis round trip
    per piece, far below a token step)."""

    def __init__(self, job_id: str, stream: bool) -> None:
        self.job_id, self.stream = job_id, stream
        self.cancelled = False
        self.pieces = 0

    def __call__(self, text: str) -> bool:
        if self.cancelled:
            return False
        self.cancelled = events.publish_token(self.job_id, text if self.stream else None, first=self.pieces == 0)
        self.pieces += 1
        return not self.cancelled


def worker_device() -> str | None:
    return os.environ.get(DEVICE_ENV)


def preload_algorithms(device: str) -> None:
    """Load every deployment of this device at start, so no client pays the load time."""
    for deployment in deployments_on_device(device):
        try:
            get_algorithm(deployment.name)
        except Exception:
            log.exception("preloading %s failed; its jobs will fail until fixed", deployment.name)


def start_heartbeat(device: str) -> threading.Thread:
    """Tell the web tier this device's queue has a live worker: a key with a short TTL,
    refreshed from a daemon thread. No key → requests fail fast with 503."""
    queue = device_queue_name(device)
    interval = settings.LLM_CONFIG.worker.heartbeat_s
    stop = threading.Event()

    def beat_forever() -> None:
        while not stop.is_set():
            try:
                events.beat(queue, ttl_s=interval * 3)
            except Exception:
                log.warning("heartbeat to Redis failed; retrying")
            stop.wait(interval)

    thread = threading.Thread(target=beat_forever, name="dla-heartbeat", daemon=True)
    thread.start()
    return thread
