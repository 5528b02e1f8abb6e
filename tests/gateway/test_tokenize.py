"""`/v1/tokenize` and the count endpoints: the model's own tokenizer, in its worker."""

from __future__ import annotations

import pytest

from tests.helpers import error_of, key_row

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a token?"}]


def test_tokenize_a_prompt(live, key):
    body = live.post("/v1/tokenize", key, json={"model": "tiny-gpt2", "prompt": "hello world"}).json()
    assert body["model"] == "tiny-gpt2"
    assert body["count"] == len(body["tokens"]) > 0
    assert all(isinstance(t, int) for t in body["tokens"])


def test_chat_count_matches_what_a_chat_completion_charges(live, key):
    counted = live.post("/v1/tokenize/count", key, json={"model": "tiny-gpt2", "messages": MESSAGES}).json()
    assert set(counted) == {"model", "count"}
    reply = live.post(
        "/v1/chat/completions", key, json={"model": "tiny-gpt2", "messages": MESSAGES, "max_tokens": 1}
    ).json()
    assert counted["count"] == reply["usage"]["prompt_tokens"]


def test_seed_gateway_count_endpoint_takes_input(live, key):
    reply = live.post("/extras/tokenize/count", key, json={"model": "words", "input": "a b c d"})
    assert reply.json() == {"model": "words", "count": 4}


def test_a_model_without_a_tokenizer_is_a_bad_request(live, make_key):
    key = make_key(max_calls=2)
    reply = live.post("/v1/tokenize", key, json={"model": "seed-shaped", "prompt": "x"})
    assert reply.status_code == 400
    assert error_of(reply)["code"] == "unsupported_operation"
    assert key_row(key).calls_used == 0


def test_tokenize_costs_a_call_but_no_tokens(live, make_key):
    key = make_key(max_calls=2, max_tokens_total=5)
    live.post("/v1/tokenize", key, json={"model": "tiny-gpt2", "prompt": "a long prompt with many tokens"})
    row = key_row(key)
    assert (row.calls_used, row.tokens_used) == (1, 0)
