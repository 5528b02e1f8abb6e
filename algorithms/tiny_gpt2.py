"""A tiny random GPT-2 built offline in well under a second, for tests.

No small causal LM is available as an offline package, so tests build one: a 2-layer
GPT-2 with weights from a fixed seed and a byte-level BPE tokenizer trained on a few
built-in sentences. Its output is gibberish, but it goes through exactly the loading
and generation code that real models use, and every build is byte-identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from algorithms.prepare import TINY_GPT2_NAME, write_model_dir_atomically

END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 400
CONTEXT_LENGTH = 256
WEIGHTS_SEED = 20261123

TRAINING_SENTENCES = (
    "hello world, this is a tiny language model used in tests.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "A worker process loads the model once and answers requests from a queue.",
    "Tokens are counted for every request, and each key has a quota of calls.",
    "def run(self, input_text): return self.model.generate(input_text)",
    "Numbers 0123456789 and symbols !@#$%^&*()[]{}<>+-=_/\\|;:'\",.?~`",
    "Streams send one token at a time until the end of the text.",
)


def build_tiny_gpt2(path: str | os.PathLike[str]) -> Path:
    """Build the test model directory at ``path`` (or return at once if it is complete)."""
    marker = {"model": TINY_GPT2_NAME, "transformers": transformers.__version__}
    return write_model_dir_atomically(Path(path), _write_tiny_gpt2, marker)


def _write_tiny_gpt2(directory: Path) -> None:
    tokenizer = train_tiny_tokenizer()
    model = init_tiny_model(vocab_size=len(tokenizer), end_of_text_id=tokenizer.eos_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def train_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on :data:`TRAINING_SENTENCES`: any text encodes, nothing is unknown."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TRAINING_SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=CONTEXT_LENGTH,
    )


def init_tiny_model(vocab_size: int, end_of_text_id: int) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with weights drawn from :data:`WEIGHTS_SEED`."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=CONTEXT_LENGTH,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=end_of_text_id,
        eos_token_id=end_of_text_id,
        pad_token_id=end_of_text_id,
    )
    # fork_rng: seeding must not change the random state of the process that builds it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHTS_SEED)
        model = GPT2LMHeadModel(config)
    return model.eval()
