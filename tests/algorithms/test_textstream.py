"""Streamed text helpers: no stop string leaks, no character is split, emit's answer is obeyed."""

from __future__ import annotations

from collections.abc import Sequence

from algorithms.base import Completion
from algorithms.textstream import IncrementalDecoder, StopStringFilter, StreamedText


def push_all(stop_filter: StopStringFilter, pieces: Sequence[str]) -> list[str]:
    return [stop_filter.push(piece) for piece in pieces]


def decode_utf8(token_ids: Sequence[int]) -> str:
    """A byte-level "tokenizer": each id is one byte, decoded the way byte-level BPEs do."""
    return bytes(token_ids).decode("utf-8", errors="replace")


class Recorder:
    """An emit that records what it is given and says "stop" after ``keep_going_for`` calls.

    The generate tests of both algorithms use it too.
    """

    def __init__(self, keep_going_for: int | None = None) -> None:
        self.pieces: list[str] = []
        self.keep_going_for = keep_going_for

    def __call__(self, piece: str) -> bool:
        self.pieces.append(piece)
        return self.keep_going_for is None or len(self.pieces) < self.keep_going_for


def test_text_without_stop_strings_passes_straight_through():
    assert push_all(StopStringFilter(), ["Hello", " world"]) == ["Hello", " world"]


def test_text_before_a_stop_string_is_released_and_the_rest_dropped():
    stop_filter = StopStringFilter(["END"])
    assert push_all(stop_filter, ["one two END three"]) == ["one two "]
    assert stop_filter.stopped
    assert stop_filter.push(" more") == ""
    assert stop_filter.flush() == ""


def test_a_possible_start_of_a_stop_string_is_held_back_across_pieces():
    stop_filter = StopStringFilter(["</answer>"])
    assert push_all(stop_filter, ["forty-two<", "/ans", "wer> tail"]) == ["forty-two", "", ""]
    assert stop_filter.stopped


def test_held_back_text_is_released_when_it_does_not_become_a_stop_string():
    stop_filter = StopStringFilter(["STOP"])
    assert push_all(stop_filter, ["go ST", "ILL"]) == ["go ", "STILL"]
    assert not stop_filter.stopped


def test_flush_releases_a_held_back_tail_at_the_end():
    stop_filter = StopStringFilter(["STOP"])
    assert stop_filter.push("almost ST") == "almost "
    assert stop_filter.flush() == "ST"
    assert not stop_filter.stopped


def test_the_earliest_of_several_stop_strings_wins():
    stop_filter = StopStringFilter(["world", "lo"])
    assert stop_filter.push("hello world") == "hel"


def test_the_longest_partial_match_is_held_back():
    stop_filter = StopStringFilter(["ab", "xxabc"])
    assert stop_filter.push("1xxa") == "1"
    assert stop_filter.push("bd") == "xx"
    assert stop_filter.stopped


def test_empty_stop_strings_are_ignored():
    assert push_all(StopStringFilter([""]), ["a", "b"]) == ["a", "b"]


def test_incremental_decoding_never_splits_a_multi_byte_character():
    decoder = IncrementalDecoder(decode_utf8)
    euro = list("€".encode())  # three bytes
    deltas = [decoder.push(token) for token in [*b"5 ", *euro, *b"!"]]
    assert deltas == ["5", " ", "", "", "€", "!"]


def test_incremental_decoding_flushes_an_unfinished_character_at_the_end():
    decoder = IncrementalDecoder(decode_utf8)
    assert decoder.push(ord("a")) == "a"
    assert decoder.push(0xE2) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.token_ids == [ord("a"), 0xE2]


def test_streamed_text_emits_only_non_empty_pieces_that_join_to_the_text():
    emit = Recorder()
    stream = StreamedText(emit, ["STOP"])
    for piece in ["", "a", "ST", "OP", "b"]:
        stream.add(piece)
    stream.close()
    assert emit.pieces == ["a"]
    assert stream.text == "a"
    assert stream.completion(3, 4, "length").finish_reason == "stop"


def test_streamed_text_stops_adding_once_emit_says_no():
    emit = Recorder(keep_going_for=2)
    stream = StreamedText(emit)
    for piece in ["a", "b", "c"]:
        stream.add(piece)
    stream.close()
    assert stream.cancelled and stream.done
    assert emit.pieces == ["a", "b"]
    completion = stream.completion(1, 2, "length")
    assert (completion.text, completion.finish_reason) == ("ab", "cancelled")


def test_streamed_text_reports_the_models_own_reason_otherwise():
    stream = StreamedText(Recorder(), ["never"])
    stream.add("nev")
    stream.close()
    completion = stream.completion(5, 1, "length")
    assert completion == Completion("nev", 5, 1, "length")
