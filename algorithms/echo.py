"""A deterministic algorithm with no model, for tests, benchmarks and smoke checks.

``delay_ms`` stands in for GPU time, so queueing, time limits and cancellation can be
exercised without loading a model.
"""

from __future__ import annotations

import time


class Echo:
    """Return the input, optionally after a prefix and a fixed delay."""

    def __init__(self, device: str = "cpu", delay_ms: float = 0, prefix: str = "") -> None:
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        self.device = device
        self.delay_seconds = delay_ms / 1000
        self.prefix = prefix

    def run(self, input_text: str) -> str:
        """Sleep ``delay_ms``, then return ``prefix + input_text``."""
        if self.delay_seconds:
            time.sleep(self.delay_seconds)
        return f"{self.prefix}{input_text}"

    def count_tokens(self, text: str) -> int:
        """Whitespace-separated words: a stable, model-free stand-in for tokens."""
        return len(text.split())
