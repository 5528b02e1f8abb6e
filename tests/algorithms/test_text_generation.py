"""TextGeneration on the tiny GPT-2: the same loading and generation code as real models."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from algorithms.prepare import PREPARED_MARKER, is_prepared
from algorithms.tiny_gpt2 import build_tiny_gpt2
from algorithms.transformers_lm import TextGeneration


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="module")
def generator(tiny_model_dir) -> TextGeneration:
    return TextGeneration(model_path=str(tiny_model_dir), max_new_tokens=16)


def directory_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_tiny_gpt2_builds_byte_identically_and_quickly(tmp_path):
    started = time.monotonic()
    first = build_tiny_gpt2(tmp_path / "a")
    elapsed = time.monotonic() - started
    second = build_tiny_gpt2(tmp_path / "b")
    assert directory_bytes(first) == directory_bytes(second)
    assert {"config.json", "model.safetensors", "tokenizer.json", PREPARED_MARKER} <= set(directory_bytes(first))
    assert elapsed < 5  # ~0.2 s here; the bound only catches a build that went badly wrong


def test_tiny_gpt2_build_is_idempotent_and_leaves_no_staging(tmp_path):
    dest = build_tiny_gpt2(tmp_path / "tiny")
    model_file = dest / "model.safetensors"
    before = model_file.stat().st_mtime_ns
    assert build_tiny_gpt2(dest) == dest
    assert model_file.stat().st_mtime_ns == before
    assert is_prepared(dest)
    assert [path.name for path in tmp_path.iterdir()] == ["tiny"]


def test_run_is_deterministic_across_instances(tiny_model_dir, generator):
    other = TextGeneration(model_path=str(tiny_model_dir), max_new_tokens=16)
    answer = generator.run("hello")
    assert isinstance(answer, str) and answer
    assert other.run("hello") == answer
    assert generator.run("hello") == answer


def test_seeded_sampling_repeats_for_the_same_seed(tiny_model_dir):
    options = {"model_path": str(tiny_model_dir), "max_new_tokens": 16, "temperature": 0.9}
    first = TextGeneration(seed=7, **options)
    assert first.run("hello") == TextGeneration(seed=7, **options).run("hello")


def test_count_tokens_uses_the_model_tokenizer(generator):
    assert generator.count_tokens("") == 0
    assert generator.count_tokens("hello world") == len(generator.tokenizer.encode("hello world"))
    assert generator.count_tokens("hello world hello world") > generator.count_tokens("hello world")


def test_max_new_tokens_is_respected(tiny_model_dir):
    completion = TextGeneration(model_path=str(tiny_model_dir), max_new_tokens=5).complete("hello")
    assert completion.completion_tokens <= 5
    assert completion.finish_reason in {"stop", "length"}


def test_long_prompt_keeps_its_end_within_the_context(generator):
    # The tiny model has 256 positions, so 16 new tokens leave 240 for the prompt.
    prompt = "hello world " * 400 + "THE END"
    prompt_ids = generator.encode_prompt(generator.render_prompt(prompt))
    assert len(prompt_ids) == 256 - 16
    assert generator.tokenizer.decode(prompt_ids).endswith("THE END")
    assert generator.complete(prompt).prompt_tokens == 256 - 16


def test_an_empty_text_is_answered_from_the_start_token(generator):
    # `POST /api/ {"text": ""}` crashed the model (an empty input tensor): found by schemathesis.
    completion = generator.complete("")
    assert completion.prompt_tokens == 1
    assert 1 <= completion.completion_tokens <= 16
    assert isinstance(generator.run(""), str)


def test_prompt_without_chat_template_is_the_raw_text(generator):
    assert generator.render_prompt("just text") == "just text"


def test_missing_model_directory_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="preparemodels"):
        TextGeneration(model_path=str(tmp_path / "absent"))


def test_max_new_tokens_that_fills_the_context_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="no room for a prompt"):
        TextGeneration(model_path=str(tiny_model_dir), max_new_tokens=256)


def test_auto_dtype_follows_native_bfloat16_not_avx512():
    from algorithms.transformers_lm import cpu_has_native_bfloat16

    assert cpu_has_native_bfloat16("flags\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bfloat16("flags\t: fpu avx512f amx_bf16\n")
    # AVX-512 without bf16: emulated bfloat16, slower than float32 in batches.
    plain = "flags\t: fpu sse2 avx2 avx512f avx512bw avx512vl\n"
    assert cpu_has_native_bfloat16(plain) is ("AMX" in __import__("torch").backends.cpu.get_cpu_capability())
