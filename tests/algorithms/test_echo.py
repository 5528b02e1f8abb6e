"""Echo is the model-free stand-in: deterministic output, a controllable delay."""

from __future__ import annotations

import time

import pytest

from algorithms.base import Completion, GenerationRequest
from algorithms.echo import Echo
from tests.algorithms.test_textstream import Recorder


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


def user_turns(*contents: str) -> tuple[dict[str, str], ...]:
    return tuple({"role": "user", "content": content} for content in contents)


def generate(echo: Echo, emit: Recorder | None = None, **request: object) -> tuple[Completion, list[str]]:
    """Run one request and return the completion with the pieces ``emit`` received."""
    request.setdefault("max_tokens", 100)
    emit = emit or Recorder()
    return echo.generate(GenerationRequest(**request), emit), emit.pieces


def test_generate_streams_the_prompt_back_one_word_at_a_time():
    completion, pieces = generate(Echo(), prompt="  one two\tthree\n")
    assert pieces == ["one ", "two\t", "three\n"]
    assert completion == Completion("one two\tthree\n", prompt_tokens=3, completion_tokens=3, finish_reason="stop")


def test_chat_echoes_the_last_user_message_after_the_prefix():
    messages = (
        {"role": "system", "content": "be kind"},
        *user_turns("first question"),
        {"role": "assistant", "content": "an answer"},
        *user_turns("second question"),
    )
    completion, pieces = generate(Echo(prefix="echo: "), messages=messages)
    assert pieces == ["echo: ", "second ", "question"]
    assert completion.finish_reason == "stop"


def test_chat_without_a_user_message_echoes_nothing():
    completion, pieces = generate(Echo(), messages=({"role": "system", "content": "be kind"},))
    assert pieces == []
    assert (completion.text, completion.completion_tokens, completion.finish_reason) == ("", 0, "stop")


def test_max_tokens_cuts_the_words_with_finish_reason_length():
    completion, pieces = generate(Echo(), prompt="a b c d e", max_tokens=2)
    assert pieces == ["a ", "b "]
    assert (completion.completion_tokens, completion.finish_reason) == (2, "length")


def test_the_deployment_max_new_tokens_caps_the_request():
    completion, _ = generate(Echo(max_new_tokens=3), prompt="a b c d e", max_tokens=100)
    assert (completion.completion_tokens, completion.finish_reason) == (3, "length")


def test_repeat_cycles_through_the_words_until_max_tokens():
    completion, pieces = generate(Echo(repeat=True), prompt="tick tock ", max_tokens=5)
    assert pieces == ["tick ", "tock ", "tick ", "tock ", "tick "]
    assert (completion.completion_tokens, completion.finish_reason) == (5, "length")


def test_a_stop_string_cuts_the_text_and_is_never_emitted():
    completion, pieces = generate(Echo(), prompt="alpha beta gamma delta", stop=("a gam", "zzz"))
    assert "".join(pieces) == completion.text == "alpha bet"
    # "gamma " completed the stop string, so it was produced (and counted) but not sent.
    assert (completion.completion_tokens, completion.finish_reason) == (3, "stop")


def test_a_stop_string_spanning_repeated_words_stops_a_repeating_echo():
    completion, _ = generate(Echo(repeat=True), prompt="x y", stop=("y x",), max_tokens=100)
    assert (completion.text, completion.finish_reason) == ("x ", "stop")
    completion, _ = generate(Echo(repeat=True), prompt="xy ", stop=("y x",), max_tokens=100)
    assert (completion.text, completion.completion_tokens, completion.finish_reason) == ("x", 2, "stop")


def test_repeating_keeps_words_apart():
    completion, _ = generate(Echo(repeat=True), prompt="a b", max_tokens=5)
    assert (completion.text, completion.finish_reason) == ("a b a b a ", "length")


def test_emit_returning_false_cancels_at_once():
    emit = Recorder(keep_going_for=2)
    completion, pieces = generate(Echo(repeat=True), emit, prompt="on and on", max_tokens=1000)
    assert pieces == ["on ", "and "]
    assert completion == Completion("on and ", prompt_tokens=3, completion_tokens=2, finish_reason="cancelled")


def test_each_word_takes_the_token_delay():
    started = time.monotonic()
    generate(Echo(token_delay_ms=20), prompt="a b c")
    assert time.monotonic() - started >= 3 * 0.02


def test_prompt_tokens_count_every_message_word():
    echo = Echo()
    request = GenerationRequest(
        max_tokens=1, messages=({"role": "system", "content": "be kind"}, *user_turns("hello there world"))
    )
    assert echo.count_prompt_tokens(request) == 5
    assert echo.tokenize(request) == [0, 1, 2, 3, 4]
    assert echo.generate(request, Recorder()).prompt_tokens == 5


def test_negative_token_delay_and_zero_max_new_tokens_are_refused():
    with pytest.raises(ValueError, match="token_delay_ms"):
        Echo(token_delay_ms=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Echo(max_new_tokens=0)


def test_generate_spends_delay_ms_once_before_the_first_word():
    started = time.monotonic()
    generate(Echo(delay_ms=50), prompt="a b c")
    assert time.monotonic() - started >= 0.05
