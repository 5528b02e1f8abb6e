"""A deterministic algorithm with no model, for tests, benchmarks and smoke checks.

``delay_ms`` stands in for GPU time, so queueing, time limits and cancellation can be
exercised without loading a model; ``token_delay_ms`` does the same for each streamed
token, so a stream can be watched, interrupted, or made as long as a test needs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from itertools import cycle, islice

from algorithms.base import Completion, Emit, GenerationRequest, last_user_message
from algorithms.textstream import StreamedText

WORD = re.compile(r"\S+\s*")


def split_words(text: str) -> list[str]:
    """Echo's "tokens": each word with the whitespace after it (joined: ``text`` minus leading space)."""
    return WORD.findall(text)


class Echo:
    """Return the input, optionally after a prefix and a fixed delay.

    :meth:`generate` streams the text back one word at a time: the last user message of
    a chat, or the prompt of a completion, after ``prefix``. It stops when the words run
    out, or with ``repeat`` cycles through them until ``max_tokens``, so a test can hold
    a stream open for as long as it likes.
    """

    def __init__(
        self,
        device: str = "cpu",
        delay_ms: float = 0,
        prefix: str = "",
        token_delay_ms: float = 0,
        max_new_tokens: int = 256,
        repeat: bool = False,
    ) -> None:
        for name, value in (("delay_ms", delay_ms), ("token_delay_ms", token_delay_ms)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.device = device
        self.delay_seconds = delay_ms / 1000
        self.prefix = prefix
        self.token_delay_seconds = token_delay_ms / 1000
        self.max_new_tokens = max_new_tokens
        self.repeat = repeat

    def run(self, input_text: str) -> str:
        """Sleep ``delay_ms``, then return ``prefix + input_text``."""
        if self.delay_seconds:
            busy(self.delay_seconds)
        return f"{self.prefix}{input_text}"

    def generate(self, request: GenerationRequest, emit: Emit) -> Completion:
        """Stream the echoed words through ``emit``, one per ``token_delay_ms``.

        ``delay_ms`` is spent once before the first word, like a model reading its prompt.
        Stop strings and cancellation behave as for a real model (see ``StreamedText``).
        """
        words = split_words(self.prefix + _echoed_text(request))
        limit = min(request.max_tokens, self.max_new_tokens)
        stream = StreamedText(emit, request.stop)
        if self.delay_seconds:
            busy(self.delay_seconds)
        produced = 0
        for word in self._word_steps(words, limit):
            if self.token_delay_seconds:
                time.sleep(self.token_delay_seconds)
            produced += 1
            stream.add(word)
            if stream.done:
                break
        stream.close()
        more_to_say = produced < len(words) or (self.repeat and bool(words))
        return stream.completion(self.count_prompt_tokens(request), produced, "length" if more_to_say else "stop")

    def tokenize(self, request: GenerationRequest) -> list[int]:
        """Stand-in token ids: one per word of the prompt (``0, 1, 2, ...``), nothing a model could read."""
        return list(range(len(split_words(_prompt_text(request)))))

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Words in the prompt: every message's content for a chat, else the prompt."""
        return len(self.tokenize(request))

    def count_tokens(self, text: str) -> int:
        """Whitespace-separated words: a stable, model-free stand-in for tokens."""
        return len(text.split())

    def _word_steps(self, words: list[str], limit: int) -> Iterator[str]:
        if self.repeat and words and words[-1] == words[-1].rstrip():
            words = [*words[:-1], words[-1] + " "]  # "a b" repeated reads "a b a b", not "a ba b"
        return islice(cycle(words) if self.repeat else iter(words), limit)


def _echoed_text(request: GenerationRequest) -> str:
    """What Echo answers with: the last user message of a chat (``""`` if none), or the prompt."""
    if request.messages is None:
        return request.prompt or ""
    return last_user_message(request.messages)


def _prompt_text(request: GenerationRequest) -> str:
    """The prompt as Echo "reads" it: a chat's contents joined with newlines, or the prompt."""
    if request.messages is None:
        return request.prompt or ""
    return "\n".join(m["content"] for m in request.messages)


def busy(seconds: float, slice_s: float = 0.05) -> None:
    """Stand in for device work: sleep in short slices, as a model's forward pass
    returns to Python between kernels, so a soft time limit raised in the device
    thread lands within a slice."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, slice_s))
