"""The ceiling of bench/batching.py: the model itself in this process, no server.

Two ways to decode a batch of B requests, B = 1 and 16, each timed from the call:

- `TextGeneration.start_batch()`: the continuous batch the device worker drives (all B
  added, each prefilled on its own, then `step` until every member has ended); a
  member's latency is the call to its completion, its TTFT the call to its first text.
- `model.generate` on one left-padded batch (the prompts padded to one length, the
  padding masked): the reference, what transformers gives for the same forward passes.
  Every row comes back when the slowest ends, so each request's latency is the call's;
  TTFT is the call to the first step (a stopping criterion that only timestamps).

Tokens/s = the completion tokens made / the wall time of the call(s). Greedy decoding
(temperature 0) and the same prompts as the server's cases.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from report import latency_summary, rounded, say
from transformers import StoppingCriteria, StoppingCriteriaList

if TYPE_CHECKING:
    from algorithms.base import GenerationRequest

RAW_BATCHES = (1, 16)
KINDS = ("start_batch", "generate")


@dataclass
class RawRun:
    """One batched call: B requests, what each made and when (seconds from the call)."""

    kind: str
    batch: int
    wall_s: float
    tokens: list[int]
    ttft_s: list[float]
    latency_s: list[float]
    finish_reasons: list[str] = field(default_factory=list)


def run_start_batch(algorithm: Any, requests: Sequence[GenerationRequest]) -> RawRun:
    """All requests added to one `start_batch()` session (prefilled together), then
    stepped until it empties:
    what the worker does when they all arrive together, without the queue or HTTP."""
    first: dict[int, float] = {}
    ended: dict[int, tuple[float, Any]] = {}
    session = algorithm.start_batch()
    t0 = time.perf_counter()
    slot_of: dict[int, int] = {}
    joined = session.add([(request, first_text_timer(first, slot)) for slot, request in enumerate(requests)])
    for slot, (handle, completion) in enumerate(joined):
        slot_of[handle] = slot
        if completion is not None:
            ended[slot] = (time.perf_counter(), completion)
    while len(session):
        for handle, completion in session.step():
            ended[slot_of[handle]] = (time.perf_counter(), completion)
    wall = time.perf_counter() - t0
    slots = range(len(requests))
    return RawRun(
        kind="start_batch",
        batch=len(requests),
        wall_s=wall,
        tokens=[ended[s][1].completion_tokens for s in slots],
        ttft_s=[first[s] - t0 for s in slots if s in first],
        latency_s=[ended[s][0] - t0 for s in slots],
        finish_reasons=[ended[s][1].finish_reason for s in slots],
    )


def first_text_timer(first: dict[int, float], slot: int) -> Callable[[str], bool]:
    """An `emit` that only notes when its member's first non-empty text came."""

    def emit(text: str) -> bool:
        if text and slot not in first:
            first[slot] = time.perf_counter()
        return True

    return emit


class FirstStep(StoppingCriteria):
    """Never stops anything; notes when `generate` finished its first step (prefill and
    the first token of every row)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.at is None:
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run_padded_generate(algorithm: Any, requests: Sequence[GenerationRequest], max_tokens: int) -> RawRun:
    """`model.generate` on the prompts left-padded into one batch, greedy: the reference."""
    prompts = [algorithm.tokenize(request) for request in requests]
    width = max(len(ids) for ids in prompts)
    pad = algorithm.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=algorithm.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=algorithm.device)
    first = FirstStep()
    stop_ids = stop_token_ids(algorithm.model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        output = algorithm.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            generation_config=greedy_config(algorithm.model, max_tokens, pad),
            stopping_criteria=StoppingCriteriaList([first]),
        )
    if algorithm.device.type == "cuda":
        torch.cuda.synchronize(algorithm.device)  # the last step's kernels, before the clock stops
    wall = time.perf_counter() - t0
    made = [row_tokens(row, stop_ids) for row in output[:, width:].tolist()]
    return RawRun(
        kind="generate",
        batch=len(requests),
        wall_s=wall,
        tokens=[n for n, _reason in made],
        ttft_s=[first.at - t0] * len(requests) if first.at else [],
        latency_s=[wall] * len(requests),
        finish_reasons=[reason for _n, reason in made],
    )


def greedy_config(model: Any, max_tokens: int, pad: int) -> Any:
    """The model's generation config made greedy and capped, as the server's is."""
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens, config.max_length, config.pad_token_id = max_tokens, None, pad
    config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    return config


def stop_token_ids(model: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    return set(ids) if isinstance(ids, list) else {ids}


def row_tokens(row: list[int], stop_ids: set[int]) -> tuple[int, str]:
    """Tokens a padded row really made: up to and with its first end-of-text (`generate`
    pads a row that ended early until the batch ends)."""
    for index, token in enumerate(row):
        if token in stop_ids:
            return index + 1, "stop"
    return len(row), "length"


def run_raw(algorithm: Any, kind: str, requests: Sequence[GenerationRequest], max_tokens: int) -> RawRun:
    if kind == "start_batch":
        return run_start_batch(algorithm, requests)
    return run_padded_generate(algorithm, requests, max_tokens)


def measure_raw(
    algorithm: Any, requests_for: Callable[[int, int], list[GenerationRequest]], max_tokens: int, rounds: int
) -> list[dict]:
    """Each kind at each batch size, `rounds` times, after one short warm-up of each.
    `requests_for(batch, max_tokens)` gives the batch's requests (distinct prompts)."""
    for kind in KINDS:
        for batch in RAW_BATCHES:
            run_raw(algorithm, kind, requests_for(batch, 4), 4)
    runs: dict[tuple[str, int], list[RawRun]] = {(kind, batch): [] for kind in KINDS for batch in RAW_BATCHES}
    for round_ in range(rounds):
        for kind, batch in runs:
            run = run_raw(algorithm, kind, requests_for(batch, max_tokens), max_tokens)
            runs[kind, batch].append(run)
            say(
                f"raw {kind}, batch {batch} ({round_ + 1}/{rounds}): {sum(run.tokens) / run.wall_s:.1f} tok/s, "
                f"{run.wall_s:.2f} s"
            )
    return [raw_case(kind, batch, kept) for (kind, batch), kept in runs.items()]


def raw_case(kind: str, batch: int, runs: list[RawRun]) -> dict:
    """One kind at one batch size over its rounds: tokens/s (all tokens / all wall time),
    per-request latency and TTFT."""
    tokens = [n for run in runs for n in run.tokens]
    wall = sum(run.wall_s for run in runs)
    return {
        "case": f"in-process {kind}, batch {batch}",
        "kind": kind,
        "batch": batch,
        "rounds": len(runs),
        "requests": len(tokens),
        "completion_tokens_total": sum(tokens),
        "completion_tokens_mean": rounded(sum(tokens) / len(tokens)) if tokens else None,
        "completion_tokens_min": min(tokens, default=None),
        "finish_reasons": sorted({reason for run in runs for reason in run.finish_reasons}),
        "wall_s": rounded(wall),
        "tokens_per_s": rounded(sum(tokens) / wall) if wall else None,
        "ttft": latency_summary(t for run in runs for t in run.ttft_s),
        "latency": latency_summary(t for run in runs for t in run.latency_s),
    }
