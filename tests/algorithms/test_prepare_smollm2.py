"""The SmolLM2 demo model: converted once from the wheel's GGUF, then loaded as a plain directory.

Slow (~40 s for the conversion on 2 cores). Set DLA_TEST_MODELS_DIR to keep the converted
model between runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from algorithms.prepare import PREPARED_MARKER, SMOLLM2_NAME, prepare_model
from algorithms.transformers_lm import TextGeneration

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    configured = os.environ.get("DLA_TEST_MODELS_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def smollm2_dir(models_dir) -> Path:
    return prepare_model(SMOLLM2_NAME, models_dir)


def test_conversion_writes_a_plain_model_directory(smollm2_dir):
    names = {path.name for path in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", PREPARED_MARKER} <= names
    assert "quantization_config" not in (smollm2_dir / "config.json").read_text()


def test_second_prepare_returns_at_once(smollm2_dir):
    started = time.monotonic()
    assert prepare_model(SMOLLM2_NAME, smollm2_dir.parent) == smollm2_dir
    assert time.monotonic() - started < 1


def test_answers_the_capital_of_france(smollm2_dir):
    generator = TextGeneration(model_path=str(smollm2_dir), max_new_tokens=24)
    assert "<|im_start|>assistant" in generator.render_prompt("What is the capital of France?")
    completion = generator.complete("What is the capital of France?")
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"
