"""How each kind of job runs on a loaded algorithm: one job (`run_job_kind`), or a
group in one call (`run_embeddings_batch`, `run_text_batch`). Only the device loop
(`llmjobs.device`) calls these, in the thread that owns the device; what an outcome
does to the job's row and key is `llmjobs.lifecycle`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from algorithms.base import Completion, GenerationRequest, last_user_message
from algorithms.capabilities import Capabilities
from llmjobs import events
from llmjobs.lifecycle import Outcome
from llmjobs.models import Job


class UnsupportedOperation(Exception):
    """The deployment's algorithm lacks the method this kind of job needs."""


class ModelUnavailable(Exception):
    """The deployment's model failed to load (the reason is the message); its jobs
    fail at once until the worker tries again."""


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


def run_text_batch(algorithm: Capabilities, texts: Sequence[str]) -> list[Outcome]:
    """Several `POST /api/` jobs in one `run_batch` call: one answer per text, in order."""
    outputs = list(algorithm.run_batch(list(texts)))
    if len(outputs) != len(texts):
        raise ValueError(f"run_batch returned {len(outputs)} answers for {len(texts)} inputs")
    return [Outcome(output, output) for output in outputs]


def run_generation(algorithm: Capabilities, job_id: str, payload: dict[str, Any]) -> Outcome:
    """Chat and completions one at a time: tokens go to the job's stream as they are
    made (when a client streams), and the client's disconnect stops generation at the
    next token."""
    request = GenerationRequest.from_payload(payload["request"])
    publish = StepPublisher().emit_for(job_id, stream=bool(payload.get("stream")), eager=True)
    if algorithm.generate is not None:
        completion = algorithm.generate(request, publish)
    else:
        completion = generate_with_run(algorithm, request, publish)
    return generation_outcome(completion, publish.cancelled)


def generation_outcome(completion: Completion, cancelled: bool) -> Outcome:
    """A chat or completion's ending, as the lifecycle records it."""
    result = {
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
    }
    cancelled = cancelled or completion.finish_reason == "cancelled"
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
    return run_embeddings_batch(algorithm, [payload])[0]


def run_embeddings_batch(algorithm: Capabilities, payloads: Sequence[dict[str, Any]]) -> list[Outcome]:
    """Several `/v1/embeddings` jobs in one `embed` call (one forward pass for all
    their inputs), split back per job."""
    if algorithm.embed is None:
        raise UnsupportedOperation("This model does not compute embeddings.")
    inputs = [list(payload["input"]) for payload in payloads]
    vectors = algorithm.embed([text for texts in inputs for text in texts])
    outcomes, start = [], 0
    for texts in inputs:
        tokens = count_input_tokens(algorithm, texts)
        result = {"data": vectors[start : start + len(texts)], "prompt_tokens": tokens}
        outcomes.append(Outcome(result, None, tokens, 0, store_output=False))
        start += len(texts)
    return outcomes


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


class StepPublisher:
    """The `emit`s of generations: each piece goes to its job's stream (when its client
    streams), and each job hears at its next `emit` whether it was cancelled (False:
    stop). `flush` sends the pieces and reads the flags of all its jobs in one Redis
    round trip: a continuous batch flushes once per step (a cancelled member leaves
    within a step of its flag), a lone generation at every piece (`eager`)."""

    def __init__(self) -> None:
        self.pieces: list[tuple[str, str | None, bool]] = []
        self.members: dict[str, MemberEmit] = {}

    def emit_for(self, job_id: str, stream: bool, eager: bool = False) -> MemberEmit:
        emit = MemberEmit(self, job_id, stream, eager)
        self.members[job_id] = emit
        return emit

    def forget(self, job_id: str) -> None:
        self.members.pop(job_id, None)

    def flush(self) -> None:
        pieces, self.pieces = self.pieces, []
        if not self.members and not pieces:
            return
        for job_id in events.publish_step(pieces, list(self.members)):
            self.members[job_id].cancelled = True


class MemberEmit:
    """One job's `emit`: its pieces go through its publisher, flushed at once when
    `eager`, else with the rest of the step."""

    def __init__(self, publisher: StepPublisher, job_id: str, stream: bool, eager: bool = False) -> None:
        self.publisher, self.job_id, self.stream, self.eager = publisher, job_id, stream, eager
        self.cancelled = False
        self.pieces = 0

    def __call__(self, text: str) -> bool:
        if self.cancelled:
            return False
        self.publisher.pieces.append((self.job_id, text if self.stream else None, self.pieces == 0))
        self.pieces += 1
        if self.eager:
            self.publisher.flush()
        return not self.cancelled
