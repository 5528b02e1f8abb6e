"""Continuous batching on the tiny GPT-2, in-process: each request answers exactly as
it does alone, whoever joins or leaves around it."""

from __future__ import annotations

from pathlib import Path

import pytest

from algorithms.base import Completion, GenerationRequest
from algorithms.tiny_gpt2 import build_tiny_gpt2
from algorithms.transformers_lm import TextGeneration

CAP = 40
PROMPTS = ["A worker process", "x", "The quick brown fox jumps over the lazy", "1 2 3", "Hello", "queue"]


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> TextGeneration:
    path: Path = build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")
    return TextGeneration(model_path=str(path), max_new_tokens=CAP)


def requests_for_test() -> list[GenerationRequest]:
    plain = [GenerationRequest(max_tokens=CAP - i, prompt=p) for i, p in enumerate(PROMPTS)]
    chats = [
        GenerationRequest(max_tokens=5 + i, messages=({"role": "user", "content": p},)) for i, p in enumerate(PROMPTS)
    ]
    return plain + chats


class Pieces:
    """An `emit` that keeps what it got and can hang up after `hang_up_after` pieces."""

    def __init__(self, hang_up_after: int | None = None) -> None:
        self.pieces: list[str] = []
        self.hang_up_after = hang_up_after

    def __call__(self, text: str) -> bool:
        self.pieces.append(text)
        return self.hang_up_after is None or len(self.pieces) < self.hang_up_after


def run_staggered(generator: TextGeneration, requests: list[GenerationRequest], emits: list) -> dict[int, Completion]:
    """Three start together, then one more joins before each step."""
    batch = generator.start_batch()
    pending, handles, ended = list(enumerate(requests)), {}, {}

    def join() -> None:
        index, request = pending.pop(0)
        ((handle, completion),) = batch.add([(request, emits[index])])
        handles[handle] = index
        if completion is not None:
            ended[index] = completion

    while pending and len(handles) < 3:
        join()
    while len(batch) or pending:
        if pending:
            join()
        for handle, completion in batch.step():
            ended[handles[handle]] = completion
    return ended


def test_each_request_answers_as_it_does_alone(generator):
    requests = requests_for_test()
    alone = [generator.generate(request, Pieces()) for request in requests]
    emits = [Pieces() for _ in requests]
    batched = run_staggered(generator, requests, emits)
    for index, completion in enumerate(alone):
        assert batched[index] == completion, index
        assert "".join(emits[index].pieces) == completion.text


def test_a_seed_gives_the_same_sample_whoever_shares_the_batch(generator):
    sampled = GenerationRequest(max_tokens=12, prompt="A worker process", temperature=1.0, seed=7)
    alone = run_staggered(generator, [sampled], [Pieces()])[0]
    crowd = [sampled, *requests_for_test()[:5]]
    assert run_staggered(generator, crowd, [Pieces() for _ in crowd])[0] == alone
    assert len(alone.text) > 0


def test_a_member_that_hangs_up_leaves_alone(generator):
    requests = requests_for_test()[:4]
    quitter = Pieces(hang_up_after=2)
    emits = [quitter, Pieces(), Pieces(), Pieces()]
    batched = run_staggered(generator, requests, emits)
    assert batched[0].finish_reason == "cancelled" and len(quitter.pieces) == 2
    for index in (1, 2, 3):
        assert batched[index] == generator.generate(requests[index], Pieces())


def test_a_removed_member_frees_its_row_and_keeps_what_it_made(generator):
    batch = generator.start_batch()
    long = GenerationRequest(max_tokens=CAP, prompt="The quick brown fox jumps over the lazy")
    short = GenerationRequest(max_tokens=CAP, prompt="x")
    (first, _), (second, _) = batch.add([(long, Pieces()), (short, Pieces())])
    for _ in range(3):
        batch.step()
    made = batch.remove(first)
    assert made.completion_tokens == 4 and len(batch) == 1
    assert batch.remove(first) is None
    rest = []
    while len(batch):
        rest += batch.step()
    assert [handle for handle, _ in rest] == [second]
    assert rest[0][1] == generator.generate(short, Pieces())


def test_joiners_prefilled_together_answer_as_alone(generator):
    requests = requests_for_test()
    batch = generator.start_batch()
    emits = [Pieces() for _ in requests]
    joined = batch.add(list(zip(requests[:6], emits[:6], strict=True)))
    ended = {handle: completion for handle, completion in joined if completion is not None}
    handles = [handle for handle, _ in joined]
    batch.step()
    joined += batch.add(list(zip(requests[6:], emits[6:], strict=True)))  # a second group mid-way
    handles += [handle for handle, _ in joined[6:]]
    ended.update({handle: completion for handle, completion in joined[6:] if completion is not None})
    while len(batch):
        ended.update(dict(batch.step()))
    for index, request in enumerate(requests):
        assert ended[handles[index]] == generator.generate(request, Pieces()), index


def test_a_vanishing_temperature_decodes_greedily_in_a_batch_too(generator):
    # temperature 2e-313 overflowed the logits to inf and crashed the batch (schemathesis found it).
    greedy = GenerationRequest(max_tokens=12, prompt="A worker process", temperature=0.0)
    tiny = GenerationRequest(max_tokens=12, prompt="A worker process", temperature=2.2250738585e-313)
    expected = generator.generate(greedy, Pieces())
    assert generator.generate(tiny, Pieces()) == expected
    assert run_staggered(generator, [tiny, *requests_for_test()[:2]], [Pieces() for _ in range(3)])[0] == expected
