"""Algorithms that exist to test the server: they record what the worker did."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path


def data_dir() -> Path:
    return Path(os.environ["DJANGO_LLM_API_DATA_DIR"])


class Boom:
    """Always fails, as a crashing model would."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def run(self, input_text: str) -> str:
        raise RuntimeError("secret internal detail: /opt/models/boom.bin")


class CountingEcho:
    """Appends its process id to a file each time it is constructed."""

    def __init__(self, device: str = "cpu") -> None:
        with (data_dir() / "constructions.log").open("a") as fh:
            fh.write(f"{os.getpid()}\n")

    def run(self, input_text: str) -> dict:
        return {"text": input_text, "pid": os.getpid()}


class RecordingEcho:
    """Sleeps like a GPU job and reports when it really ran, from inside the worker."""

    def __init__(self, device: str = "cpu", delay_ms: float = 0) -> None:
        self.delay_s = delay_ms / 1000

    def run(self, input_text: str) -> dict:
        start = time.time()
        time.sleep(self.delay_s)
        return {"text": input_text, "start": start, "end": time.time(), "pid": os.getpid()}


class Stubborn:
    """Ignores the soft time limit, as C code that never returns to Python would."""

    def __init__(self, device: str = "cpu", seconds: float = 30) -> None:
        self.seconds = seconds

    def run(self, input_text: str) -> str:
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(BaseException):  # swallowing the soft limit is the point
                time.sleep(0.05)
        return input_text


class BadOutput:
    """Returns something that cannot travel as JSON."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def run(self, input_text: str) -> dict:
        return {"raw": input_text.encode()}


class BatchRecorder:
    """`run_batch`: several `/api/` texts in one call; each answer says how many shared it."""

    default_max_batch = 4

    def __init__(self, device: str = "cpu", delay_ms: float = 100) -> None:
        self.delay_s = delay_ms / 1000

    def run(self, input_text: str) -> dict:
        return self.run_batch([input_text])[0]

    def run_batch(self, inputs: list[str]) -> list[dict]:
        time.sleep(self.delay_s)
        return [{"text": text, "batch": len(inputs)} for text in inputs]


class Ticker:
    """Continuous batching without a model: every step takes `step_ms` for the whole
    batch and gives each member its next word, up to its `max_tokens`."""

    default_max_batch = 2

    def __init__(self, device: str = "cpu", step_ms: float = 50) -> None:
        self.step_s = step_ms / 1000

    def run(self, input_text: str) -> str:
        return input_text

    def start_batch(self) -> TickerBatch:
        return TickerBatch(self.step_s)


class TickerBatch:
    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.members: dict[int, list] = {}  # handle -> [request, stream, made]
        self.handles = 0

    def __len__(self) -> int:
        return len(self.members)

    def add(self, joiners):
        from algorithms.textstream import StreamedText

        joined = []
        for request, emit in joiners:
            self.handles += 1
            member = [request, StreamedText(emit, request.stop), 0]
            self.members[self.handles] = member
            joined.append((self.handles, self._advance(self.handles, member)))
        return joined

    def step(self):
        time.sleep(self.step_s)
        ended = []
        for handle, member in list(self.members.items()):
            completion = self._advance(handle, member)
            if completion is not None:
                ended.append((handle, completion))
        return ended

    def remove(self, handle):
        member = self.members.pop(handle, None)
        return None if member is None else member[1].completion(1, member[2], "length")

    def _advance(self, handle, member):
        request, stream, made = member
        stream.add("tick ")
        member[2] = made + 1
        if stream.done or member[2] >= request.max_tokens:
            del self.members[handle]
            stream.close()
            return stream.completion(1, member[2], "length")
        return None
