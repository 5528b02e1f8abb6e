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
