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
    SupportsComplete,
    SupportsCountTokens,
    SupportsCountTokensBatch,
    SupportsEmbed,
    SupportsGenerate,
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
}


def capabilities_of(algorithm: Any) -> Capabilities:
    """The methods of `algorithm` that the worker may call, found by presence."""
    found = {name: getattr(algorithm, name) for name, protocol in OPTIONAL.items() if isinstance(algorithm, protocol)}
    return Capabilities(run=algorithm.run, **found)
