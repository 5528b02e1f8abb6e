"""The Algorithm contract, written down as typing protocols.

Nothing has to inherit from these classes: any class with the right methods is an
algorithm (the seed's ``tbg_llm_example.Algorithm`` is one as it stands). Every
optional method has a protocol here, and ``algorithms.capabilities`` is the one place
that discovers which of them a loaded plug-in has (once, when it loads), so a plug-in
that only implements ``run`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class GenerationRequest:
    """What the OpenAI-compatible endpoints ask a model for, as plain data.

    Exactly one of ``messages`` (chat: ``{"role", "content"}`` dicts, content a string)
    and ``prompt`` (completions: raw text, no chat template) is set. ``max_tokens`` is
    always concrete: the web tier has already capped it by the deployment's
    ``max_new_tokens``, because the key's token budget reserved exactly that many.
    ``None`` for ``temperature``, ``top_p`` or ``seed`` means the deployment's own
    default. It crosses the queue as JSON (:meth:`as_payload` / :meth:`from_payload`).
    """

    max_tokens: int
    messages: tuple[Mapping[str, str], ...] | None = None
    prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def as_payload(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "messages": [dict(m) for m in self.messages] if self.messages is not None else None,
            "prompt": self.prompt,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop),
            "seed": self.seed,
        }

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> GenerationRequest:
        messages = payload.get("messages")
        return cls(
            max_tokens=int(payload["max_tokens"]),
            messages=tuple(dict(m) for m in messages) if messages is not None else None,
            prompt=payload.get("prompt"),
            temperature=payload.get("temperature"),
            top_p=payload.get("top_p"),
            stop=tuple(payload.get("stop") or ()),
            seed=payload.get("seed"),
        )


@dataclass(frozen=True)
class Completion:
    """One generated answer with the numbers usage records need.

    ``finish_reason``: ``"stop"`` (end-of-text token or a stop string), ``"length"``
    (hit ``max_tokens``) or ``"cancelled"`` (``emit`` returned False: nobody listens).
    ``completion_tokens`` counts every token generated, including the end-of-text one
    and any cut off by a stop string, because the device spent the time on them.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def last_user_message(messages: Sequence[Mapping[str, str]]) -> str:
    """The content of the last `user` turn ("" if none): what a plug-in that answers
    one text (`run`, Echo) takes from a chat."""
    return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")


# emit(text_delta) -> keep going? False means the client went away: stop within one
# token step and return what was made so far with finish_reason "cancelled".
Emit = Callable[[str], bool]


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
class SupportsComplete(Protocol):
    """Optional: answer ``POST /api/`` with token counts (a text generator's ``run``
    plus usage), so the seed's endpoint is charged real tokens too."""

    def complete(self, input_text: str) -> Completion:
        """Like ``run``, returning the text with its token counts and finish reason."""


@runtime_checkable
class SupportsGenerate(Protocol):
    """Optional: serve chat/completions with streaming and token counts.

    ``run`` only returns text; the OpenAI-compatible surface also needs tokens as they
    are produced and usage numbers, which is what this method supplies.
    """

    def generate(self, request: GenerationRequest, emit: Emit) -> Completion:
        """Produce the answer to ``request``, calling ``emit`` with each new piece of
        text as soon as it is decoded (the pieces joined are exactly ``Completion.text``).

        When ``emit`` returns False, stop before the next token and return with
        ``finish_reason="cancelled"``: that is how a client's disconnect frees the device.
        """


class GenerationSession(Protocol):
    """A continuous batch of generation requests (what `start_batch` returns), driven
    by the device's worker thread alone, one call at a time."""

    def __len__(self) -> int:
        """How many requests are decoding."""

    def add(self, joiners: Sequence[tuple[GenerationRequest, Emit]]) -> list[tuple[int, Completion | None]]:
        """Prefill each ``(request, emit)`` (together, in one pass where the model can)
        and emit its first piece; they decode with the others from the next
        :meth:`step`. Returns a handle per joiner, in order, each with its completion if
        that first token already ended it."""

    def step(self) -> list[tuple[int, Completion]]:
        """Make one more token for every request; return those that ended (they have
        left the batch). Each keeps ``generate``'s contract: its pieces go to its own
        ``emit``, and an ``emit`` answering False ends that request alone."""

    def remove(self, handle: int) -> Completion | None:
        """End one request now (its deadline passed) with what it made so far."""


@runtime_checkable
class SupportsBatchGeneration(Protocol):
    """Optional: continuous batching. Requests join and leave between decode steps, so
    a device serves many chats at once (up to the deployment's ``max_batch``)."""

    def start_batch(self) -> GenerationSession:
        """A new, empty batch on the model this instance keeps resident."""


@runtime_checkable
class SupportsRunBatch(Protocol):
    """Optional: answer several ``POST /api/`` texts in one call (one forward pass)."""

    def run_batch(self, inputs: Sequence[str]) -> list[str | dict]:
        """Return one answer per input, in order, each as ``run`` would."""


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


@runtime_checkable
class SupportsCountTokensBatch(Protocol):
    """Optional: count the tokens of many texts in one call (``/v1/embeddings`` usage),
    faster than one ``count_tokens`` per text."""

    def count_tokens_batch(self, texts: Sequence[str]) -> int:
        """Return the total number of tokens of ``texts`` for this model."""


@runtime_checkable
class SupportsTokenize(Protocol):
    """Optional: the token ids generation would feed the model (``/v1/tokenize``)."""

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """Return the prompt's token ids for ``request``, exactly as ``generate`` uses them."""
