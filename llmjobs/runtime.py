"""Worker side: the memoized Algorithm per deployment, and running one job of each kind.

Runs only inside a device worker process (`manage.py runworker <device>`), the one
process allowed to touch that device. What a job's outcome does to its row and its
key is `llmjobs.lifecycle`; this module only runs the model.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import close_old_connections

from algorithms.base import Completion, GenerationRequest, last_user_message
from algorithms.capabilities import Capabilities, capabilities_of
from algorithms.loader import build_algorithm
from llmjobs import events, lifecycle
from llmjobs.lifecycle import Outcome
from llmjobs.models import Job
from llmjobs.routing import device_queue_name

log = logging.getLogger(__name__)

JOB_FAILED_MESSAGE = "The model failed to process the request."
TIME_LIMIT_MESSAGE = "The job ran past its time limit and was stopped."
WORKER_LOST_MESSAGE = "The worker running this job died; the job was not completed."
DEVICE_ENV = "DLA_WORKER_DEVICE"
PRELOAD_ENV = "DLA_WORKER_PRELOAD"


@functools.cache
def get_algorithm(name: str) -> Capabilities:
    """Build a deployment's Algorithm once per process (it keeps its model resident)
    and find what it can do."""
    deployment = settings.LLM_CONFIG.deployment(name)
    if deployment is None:
        raise LookupError(f"no deployment named {name!r}")
    log.info("loading %s (%s) on %s", name, deployment.algorithm, deployment.device)
    return capabilities_of(build_algorithm(deployment.algorithm, deployment.device, deployment.options))


def execute_job(job_id: str, model: str, kind: str, payload: Any, worker: str) -> None:
    """Run one job: skip it if cancelled, claim it, run, hand the outcome to the
    lifecycle. Anything failing on the way fails the job, so none is left running."""
    close_old_connections()  # a connection broken since the last job is replaced, not reused
    if events.is_cancelled(job_id):
        log.info("job %s skipped: cancelled", job_id)
        return
    if not lifecycle.start(job_id, worker):
        fail_abandoned_job(job_id)
        return
    try:
        lifecycle.complete(job_id, run_job_kind(get_algorithm(model), job_id, kind, payload))
    except SoftTimeLimitExceeded:
        log.warning("job %s on %s stopped at its time limit", job_id, model)
        lifecycle.fail_in_worker(job_id, "job_time_limit", TIME_LIMIT_MESSAGE)
    except UnsupportedOperation as exc:
        lifecycle.fail_in_worker(job_id, "unsupported_operation", str(exc))
    except Exception:
        log.exception("job %s on %s failed", job_id, model)
        lifecycle.fail_in_worker(job_id, "job_failed", JOB_FAILED_MESSAGE)


def fail_abandoned_job(job_id: str) -> None:
    """A job already marked running that reaches a worker again was redelivered because
    the process running it died (killed, out of memory, a CUDA crash). Running it again
    could kill the next process too, so it fails, refunded, and its client is told."""
    if lifecycle.fail_in_worker(job_id, "worker_lost", WORKER_LOST_MESSAGE, only_running=True):
        log.error("job %s was abandoned by a dead worker process; marked failed", job_id)
    else:
        log.info("job %s skipped: no longer queued", job_id)


class UnsupportedOperation(Exception):
    """The deployment's algorithm lacks the method this kind of job needs."""


def run_job_kind(algorithm: Capabilities, job_id: str, kind: str, payload: Any) -> Outcome:
    handler = JOB_KINDS.get(kind)
    if handler is None:
        raise ValueError(f"unknown job kind {kind!r}")
    return handler(algorithm, job_id, payload)


def run_text(algorithm: Capabilities, job_id: str, text: str) -> Outcome:
    """`POST /api/`: the plug-in's `run`; a text generator also reports its tokens."""
    if algorithm.complete is not None:
        completion = algorithm.complete(text)
        return Outcome(completion.text, completion.text, completion.prompt_tokens, completion.completion_tokens)
    output = algorithm.run(text)
    return Outcome(output, output)


def run_generation(algorithm: Capabilities, job_id: str, payload: dict[str, Any]) -> Outcome:
    """Chat and completions: tokens go to the job's stream as they are made (when a
    client streams), and the client's disconnect stops generation at the next token."""
    request = GenerationRequest.from_payload(payload["request"])
    publish = TokenPublisher(job_id, stream=bool(payload.get("stream")))
    if algorithm.generate is not None:
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


def generate_with_run(algorithm: Capabilities, request: GenerationRequest, emit: Callable[[str], bool]) -> Completion:
    """A plug-in with only `run` still answers chat: it gets the last user message (or
    the prompt), as `POST /api/` would give it, and its answer comes as one piece.
    Tokens are counted by its `count_tokens` when it has one, else as words."""
    text = request.prompt if request.prompt is not None else last_user_message(request.messages or ())
    output = algorithm.run(text)
    output = output if isinstance(output, str) else json.dumps(output)
    if output:
        emit(output)
    count = algorithm.token_counter()
    return Completion(output, count(text), count(output), "stop")


def run_embeddings(algorithm: Capabilities, job_id: str, payload: dict[str, Any]) -> Outcome:
    if algorithm.embed is None:
        raise UnsupportedOperation("This model does not compute embeddings.")
    texts = payload["input"]
    vectors = algorithm.embed(texts)
    tokens = count_input_tokens(algorithm, texts)
    result = {"data": vectors, "prompt_tokens": tokens}
    return Outcome(result, None, tokens, 0, store_output=False)


def count_input_tokens(algorithm: Capabilities, texts: list[str]) -> int:
    if algorithm.count_tokens_batch is not None:
        return int(algorithm.count_tokens_batch(texts))
    count = algorithm.token_counter()
    return sum(int(count(text)) for text in texts)


def run_tokenize(algorithm: Capabilities, job_id: str, payload: dict[str, Any]) -> Outcome:
    """Token ids of a prompt or chat exactly as generation would feed them. Costs a
    call but no tokens: nothing was generated."""
    request = GenerationRequest.from_payload(payload["request"])
    if algorithm.tokenize is not None:
        ids = [int(i) for i in algorithm.tokenize(request)]
        result = {"tokens": ids, "count": len(ids)}
    elif algorithm.count_tokens is not None and request.prompt is not None:
        result = {"tokens": None, "count": int(algorithm.count_tokens(request.prompt))}
    else:
        raise UnsupportedOperation("This model cannot tokenize.")
    return Outcome(result, result["count"])


JOB_KINDS: dict[str, Callable[[Capabilities, str, Any], Outcome]] = {
    Job.Kind.RUN: run_text,
    Job.Kind.CHAT: run_generation,
    Job.Kind.COMPLETION: run_generation,
    Job.Kind.EMBEDDINGS: run_embeddings,
    Job.Kind.TOKENIZE: run_tokenize,
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
    for deployment in settings.LLM_CONFIG.deployments_on(device):
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
