"""The Algorithm contract, written down as typing protocols.

Nothing has to inherit from these classes: any class with the right methods is an
algorithm (the seed's ``tbg_llm_example.Algorithm`` is one as it stands). The worker
checks for the optional capabilities by presence, e.g. ``isinstance(algorithm,
SupportsEmbed)``, so a plug-in that only implements ``run`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Algorithm(Protocol):
    """What every plug-in must provide.

    The worker builds one instance per deployment and keeps it for the life of the
    process, so the constructor is where the model is loaded (once, onto ``device``)
    and ``run`` must not reload anything.
    """

    def __init__(self, device: str = "cpu", **options: Any) -> None:
        """Load the model onto ``device`` (``"cpu"``, ``"cuda:0"``, ...).

        ``options`` are the deployment's options from the config file. The loader passes
        ``device`` and each option only if the constructor accepts it, so a seed-style
        class with a no-argument ``__init__`` still loads for a ``cpu`` deployment.
        """

    def run(self, input_text: str) -> str | dict:
        """Answer one request; this is what ``POST /api/`` calls.

        Return a string, or a JSON-serialisable dict when the answer is structured.
        """


@runtime_checkable
class SupportsRunBatch(Protocol):
    """Optional: answer several queued requests in one pass.

    Batching pays on this hardware (about 10x the tokens/s at batch 16 for a small
    chat model), so a worker with several waiting jobs hands them over together.
    """

    def run_batch(self, inputs: Sequence[str]) -> list[str | dict]:
        """Return one answer per input, in the same order."""


@runtime_checkable
class SupportsGenerate(Protocol):
    """Optional: serve chat/completions with streaming and token counts.

    ``run`` only returns text; the OpenAI-compatible surface also needs tokens as they
    are produced and usage numbers, which is what this method supplies.
    """

    def generate(self, request: Any, emit: Callable[..., None]) -> Any:
        """Produce the answer to ``request``, calling ``emit`` with each piece as it is made.

        Returns the final result including prompt and completion token counts.
        """


@runtime_checkable
class SupportsEmbed(Protocol):
    """Optional: compute embeddings for ``/v1/embeddings``."""

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Return one vector per text, in the same order."""


@runtime_checkable
class SupportsCountTokens(Protocol):
    """Optional: count tokens the way the model does.

    Used for usage records and tokens-per-minute limits; without it the server can
    only estimate.
    """

    def count_tokens(self, text: str) -> int:
        """Return the number of tokens ``text`` takes for this model."""
