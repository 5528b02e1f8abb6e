"""What a loaded plug-in can do beyond `run`: the one place that discovers its optional
methods (each declared as a protocol in `algorithms.base`), once, when it loads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from algorithms.base import (
    Completion,
    Emit,
    GenerationRequest,
    GenerationSession,
    SupportsBatchGeneration,
    SupportsComplete,
    SupportsCountTokens,
    SupportsCountTokensBatch,
    SupportsEmbed,
    SupportsGenerate,
    SupportsRunBatch,
    SupportsTokenize,
)


@dataclass(frozen=True)
class Capabilities:
    """A plug-in's methods, bound; None for each optional one it lacks."""

    run: Callable[[str], Any]
    complete: Callable[[str], Completion] | None = None
    generate: Callable[[GenerationRequest, Emit], Completion] | None = None
    embed: Callable[[Sequence[str]], list[list[float]]] | None = None
    tokenize: Callable[[GenerationRequest], list[int]] | None = None
    count_tokens: Callable[[str], int] | None = None
    count_tokens_batch: Callable[[Sequence[str]], int] | None = None
    start_batch: Callable[[], GenerationSession] | None = None
    run_batch: Callable[[Sequence[str]], list[Any]] | None = None
    # Jobs in flight at once when the deployment does not say (`max_batch`): the
    # class's `default_max_batch`, else 1, the seed's one job at a time.
    default_max_batch: int = 1

    def token_counter(self) -> Callable[[str], int]:
        """The plug-in's `count_tokens`, or whitespace words when it has none."""
        return self.count_tokens or (lambda value: len(value.split()))


OPTIONAL = {
    "complete": SupportsComplete,
    "generate": SupportsGenerate,
    "embed": SupportsEmbed,
    "tokenize": SupportsTokenize,
    "count_tokens": SupportsCountTokens,
    "count_tokens_batch": SupportsCountTokensBatch,
    "start_batch": SupportsBatchGeneration,
    "run_batch": SupportsRunBatch,
}


def capabilities_of(algorithm: Any) -> Capabilities:
    """The methods of `algorithm` that the worker may call, found by presence."""
    found = {name: getattr(algorithm, name) for name, protocol in OPTIONAL.items() if isinstance(algorithm, protocol)}
    default_max_batch = getattr(algorithm, "default_max_batch", 1)
    if not isinstance(default_max_batch, int) or default_max_batch < 1:
        default_max_batch = 1
    return Capabilities(run=algorithm.run, default_max_batch=default_max_batch, **found)
