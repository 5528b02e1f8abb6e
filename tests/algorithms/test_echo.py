"""Echo is the model-free stand-in: deterministic output, a controllable delay."""

from __future__ import annotations

import time

import pytest

from algorithms.echo import Echo


def test_returns_input_unchanged_by_default():
    assert Echo().run("hello world") == "hello world"


def test_prepends_prefix():
    assert Echo(prefix="echo: ").run("hi") == "echo: hi"


def test_sleeps_for_the_delay():
    started = time.monotonic()
    Echo(delay_ms=50).run("x")
    assert time.monotonic() - started >= 0.05


def test_counts_whitespace_separated_tokens():
    assert Echo().count_tokens("  one two\tthree\nfour ") == 4
    assert Echo().count_tokens("") == 0


def test_negative_delay_is_refused():
    with pytest.raises(ValueError, match="delay_ms"):
        Echo(delay_ms=-1)
