"""Turning generated tokens into streamed text: the part every ``generate`` shares.

A model produces tokens one at a time, but a client must only ever see text that is
final: no half of a multi-byte character, and nothing that turns out to belong to a
stop string. These helpers hold such text back until it is settled. They know nothing
about torch or any model, so the model-free ``Echo`` uses them too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from algorithms.base import Completion, Emit

REPLACEMENT_CHAR = "\ufffd"


class StopStringFilter:
    """Pass text through until a stop string appears; never let any of a stop string out.

    :meth:`push` returns the part of the text seen so far that is safe to send: it keeps
    back the longest tail that could still grow into a stop string, because the next
    token decides whether it does. Once a stop string is complete, everything from its
    start on is dropped and :attr:`stopped` is True.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        # An empty stop string would match before any text; it cannot mean anything.
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        self._pending = ""

    def push(self, text: str) -> str:
        """Add newly decoded ``text``; return what can be sent now (maybe ``""``)."""
        if self.stopped:
            return ""
        pending = self._pending + text
        cut = self._first_stop_index(pending)
        if cut is not None:
            self.stopped = True
            self._pending = ""
            return pending[:cut]
        keep = self._longest_partial_stop(pending)
        self._pending = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def flush(self) -> str:
        """The text was complete after all: release what was held back."""
        released, self._pending = self._pending, ""
        return released

    def _first_stop_index(self, text: str) -> int | None:
        found = [index for index in (text.find(s) for s in self.stop) if index >= 0]
        return min(found) if found else None

    def _longest_partial_stop(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class IncrementalDecoder:
    """Decode token ids one at a time into text deltas that never split a character.

    Byte-level tokenizers can end a token in the middle of a UTF-8 sequence; decoding
    then shows U+FFFD until the rest arrives. Decoding all ids so far (not token by
    token) keeps spacing exactly as a one-shot decode, and a trailing run of U+FFFD is
    held back until the next token completes it or :meth:`flush` gives up waiting.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.token_ids: list[int] = []
        self._sent = 0  # characters of the decoded text already returned

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly settled text (maybe ``""``)."""
        self.token_ids.append(token_id)
        text = self.decode(self.token_ids)
        return self._take(text, len(text.rstrip(REPLACEMENT_CHAR)))

    def flush(self) -> str:
        """Generation is over: return whatever was held back, U+FFFD included."""
        text = self.decode(self.token_ids)
        return self._take(text, len(text))

    def _take(self, text: str, settled: int) -> str:
        delta = text[self._sent : settled]
        self._sent = max(self._sent, settled)
        return delta


class StreamedText:
    """The answer as the client receives it: filtered for stop strings, sent through ``emit``.

    Holds the one rule every ``generate`` needs: the pieces handed to ``emit`` (never
    empty) joined are exactly :attr:`text`. :attr:`done` says to stop generating, because
    a stop string matched or ``emit`` returned False (the client went away).
    """

    def __init__(self, emit: Emit, stop: Sequence[str] = ()) -> None:
        self.emit = emit
        self.stop_filter = StopStringFilter(stop)
        self.cancelled = False
        self._pieces: list[str] = []

    @property
    def stop_matched(self) -> bool:
        return self.stop_filter.stopped

    @property
    def done(self) -> bool:
        return self.cancelled or self.stop_matched

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def add(self, text: str) -> None:
        """Add newly generated text; send what is safe to send."""
        if self.done:
            return
        if not self._send(self.stop_filter.push(text)):
            self.cancelled = True

    def close(self) -> None:
        """Generation ended: send the text held back for a stop string that never came.

        Nothing is sent after a cancellation, and ``emit``'s answer here is not a
        cancellation: there is no generation left to stop.
        """
        if not self.done:
            self._send(self.stop_filter.flush())

    def completion(self, prompt_tokens: int, completion_tokens: int, ended_by: str) -> Completion:
        """The finished answer; ``ended_by`` is the model's own reason (``"stop"``/``"length"``),
        which a cancellation or a matched stop string overrides."""
        if self.cancelled:
            finish_reason = "cancelled"
        elif self.stop_matched:
            finish_reason = "stop"
        else:
            finish_reason = ended_by
        return Completion(self.text, prompt_tokens, completion_tokens, finish_reason)

    def _send(self, piece: str) -> bool:
        if not piece:
            return True
        self._pieces.append(piece)
        return self.emit(piece)
