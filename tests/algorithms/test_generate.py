"""TextGeneration.generate: streamed deltas, request overrides, stop strings, cancellation.

Most tests use the tiny GPT-2 (no chat template, gibberish but deterministic output);
the slow ones check the chat template path on the SmolLM2 demo model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from algorithms.base import Completion, GenerationRequest
from algorithms.prepare import SMOLLM2_NAME, prepare_model
from algorithms.tiny_gpt2 import build_tiny_gpt2
from algorithms.transformers_lm import TextGeneration
from tests.algorithms.test_textstream import Recorder

DEPLOYMENT_CAP = 16
# The tiny model answers this greedily with several different tokens ("ss", "ss", "M", ...),
# each of which decodes to visible text.
PROMPT = "A worker process"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="module")
def generator(tiny_model_dir) -> TextGeneration:
    return TextGeneration(model_path=str(tiny_model_dir), max_new_tokens=DEPLOYMENT_CAP)


def generate(generator: TextGeneration, **request: object) -> tuple[Completion, list[str]]:
    """Run one request and return the completion with the pieces ``emit`` received."""
    request.setdefault("max_tokens", DEPLOYMENT_CAP)
    if "messages" not in request:
        request.setdefault("prompt", PROMPT)
    emit = Recorder()
    return generator.generate(GenerationRequest(**request), emit), emit.pieces


def test_emitted_pieces_join_to_exactly_the_completion_text(generator):
    completion, pieces = generate(generator)
    assert len(pieces) > 1
    assert all(pieces)
    assert "".join(pieces) == completion.text


def test_chat_emits_the_same_way(generator):
    completion, pieces = generate(generator, messages=({"role": "user", "content": "hello"},))
    assert completion.text and "".join(pieces) == completion.text


def test_stops_at_max_tokens_with_finish_reason_length(generator):
    completion, _ = generate(generator, max_tokens=5)
    assert (completion.completion_tokens, completion.finish_reason) == (5, "length")


def test_max_tokens_above_the_deployment_cap_is_capped(generator):
    completion, _ = generate(generator, max_tokens=10 * DEPLOYMENT_CAP)
    assert (completion.completion_tokens, completion.finish_reason) == (DEPLOYMENT_CAP, "length")


def test_temperature_zero_in_the_request_is_greedy_even_on_a_sampling_deployment(tiny_model_dir):
    sampling = TextGeneration(model_path=str(tiny_model_dir), max_new_tokens=DEPLOYMENT_CAP, temperature=1.0)
    first, _ = generate(sampling, temperature=0)
    second, _ = generate(sampling, temperature=0)
    assert first.text == second.text


def test_the_request_seed_makes_sampling_repeatable(generator):
    def sample(seed: int) -> str:
        return generate(generator, temperature=1.0, seed=seed)[0].text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_messages_use_the_plain_template_when_the_model_has_none(generator):
    messages = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    )
    rendered = generator.render_messages(messages)
    assert rendered == "system: Be brief.\nuser: Hi\nassistant: Hello.\nuser: Bye\nassistant:"
    request = GenerationRequest(max_tokens=4, messages=messages)
    assert generator.tokenize(request) == generator.tokenizer.encode(rendered)


def test_a_prompt_is_fed_as_raw_text(generator):
    request = GenerationRequest(max_tokens=4, prompt="just text")
    assert generator.tokenize(request) == generator.tokenizer.encode("just text")


def test_counted_prompt_tokens_match_what_generate_reports(generator):
    for request in (
        {"prompt": PROMPT},
        {"messages": ({"role": "user", "content": "hello world"},)},
    ):
        completion, _ = generate(generator, **request)
        count = generator.count_prompt_tokens(GenerationRequest(max_tokens=DEPLOYMENT_CAP, **request))
        assert completion.prompt_tokens == count


def test_a_long_chat_keeps_its_end_within_the_prompt_budget(generator):
    messages = ({"role": "user", "content": "hello world " * 400 + "THE END"},)
    completion, _ = generate(generator, messages=messages, max_tokens=2)
    assert completion.prompt_tokens == generator.prompt_budget
    ids = generator.tokenize(GenerationRequest(max_tokens=2, messages=messages))
    assert generator.tokenizer.decode(ids).endswith("THE END\nassistant:")


def test_returning_false_from_emit_cancels_before_the_next_token(generator):
    emit = Recorder(keep_going_for=3)
    completion = generator.generate(GenerationRequest(max_tokens=DEPLOYMENT_CAP, prompt=PROMPT), emit)
    assert completion.finish_reason == "cancelled"
    assert len(emit.pieces) == 3
    assert completion.text == "".join(emit.pieces)
    # Every token of PROMPT's answer decodes to text, so three pieces are three tokens:
    # generation stopped on the token whose piece was refused, not one step later.
    assert completion.completion_tokens == 3


def first_new_substring(text: str, length: int = 2) -> tuple[str, int]:
    """A substring of ``text`` that first occurs after its start, and where it occurs."""
    for index in range(1, len(text) - length + 1):
        candidate = text[index : index + length]
        if text.find(candidate) == index:
            return candidate, index
    raise AssertionError(f"no usable stop string in {text!r}")


def test_a_stop_string_cuts_the_text_right_before_it(generator):
    full, _ = generate(generator)
    stop, index = first_new_substring(full.text)
    completion, pieces = generate(generator, stop=("never appears", stop))
    assert completion.text == full.text[:index]
    assert stop not in "".join(pieces)
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens < full.completion_tokens


def test_text_held_back_for_a_stop_string_that_never_completes_is_sent_at_the_end(generator):
    full, _ = generate(generator)
    almost = full.text[-1] + "\x00never"  # the answer's last character starts this stop string
    completion, pieces = generate(generator, stop=(almost,))
    assert (completion.text, completion.finish_reason) == (full.text, full.finish_reason)
    assert "".join(pieces) == full.text


def test_an_end_of_text_token_finishes_with_stop_and_is_counted(generator):
    # Observed on the tiny model's fixed weights: from a bare start token, its first
    # greedy token is end-of-text.
    completion, pieces = generate(generator, prompt="")
    assert completion == Completion(text="", prompt_tokens=1, completion_tokens=1, finish_reason="stop")
    assert pieces == []


def test_a_request_needs_exactly_one_of_messages_and_prompt(generator):
    with pytest.raises(ValueError, match="exactly one"):
        generator.tokenize(GenerationRequest(max_tokens=4))
    with pytest.raises(ValueError, match="exactly one"):
        generator.tokenize(GenerationRequest(max_tokens=4, prompt="a", messages=({"role": "user", "content": "b"},)))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> TextGeneration:
    configured = os.environ.get("DLA_TEST_MODELS_DIR")
    models_dir = Path(configured) if configured else tmp_path_factory.mktemp("models")
    return TextGeneration(model_path=str(prepare_model(SMOLLM2_NAME, models_dir)), max_new_tokens=24)


CAPITAL_QUESTION = ({"role": "user", "content": "What is the capital of France?"},)


@pytest.mark.slow
def test_smollm2_chat_uses_its_template_and_streams_the_answer(smollm2):
    completion, pieces = generate(smollm2, messages=CAPITAL_QUESTION, max_tokens=24)
    rendered = smollm2.tokenizer.apply_chat_template(
        [dict(m) for m in CAPITAL_QUESTION], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>assistant" in smollm2.render_messages(CAPITAL_QUESTION)
    assert completion.prompt_tokens == len(smollm2.tokenizer.encode(rendered, add_special_tokens=False))
    assert "Paris" in completion.text
    assert completion.finish_reason in {"stop", "length"}
    assert len(pieces) > 1 and "".join(pieces) == completion.text


@pytest.mark.slow
def test_smollm2_ends_on_its_end_of_turn_token(smollm2):
    completion, _ = generate(smollm2, messages=CAPITAL_QUESTION, max_tokens=24)
    assert completion.finish_reason == "stop"
    assert "<|im_end|>" not in completion.text
    # The end-of-turn token is counted but decodes to nothing.
    visible_tokens = smollm2.count_tokens(completion.text)
    assert completion.completion_tokens >= visible_tokens + 1


@pytest.mark.slow
def test_smollm2_never_streams_half_a_character(smollm2):
    # SmolLM2 spells each emoji over several byte-level tokens.
    messages = ({"role": "user", "content": "Write the word café three times, with emojis like 🎉."},)
    completion, pieces = generate(smollm2, messages=messages, max_tokens=24)
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == completion.text
