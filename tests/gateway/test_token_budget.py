"""A key's lifetime token budget: reserved at dispatch (`max_tokens` and the prompt's
bound), settled to what the call used, exact under concurrency, never overspent by a
long prompt."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from apikeys.models import ApiKey
from llmjobs.admission import prompt_bound
from llmjobs.models import Job
from tests.helpers import error_of, key_row

pytestmark = pytest.mark.django_db(transaction=True)

# "words" echoes words as tokens: 3 prompt words + 3 answer words = 6 tokens a call,
# while each call reserves its max_tokens of 8 and its prompt's bound (the Job row's
# transcript "user: one two three": 19 bytes, plus the template's allowance).
ASK = {"model": "words", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 8}
PROMPT_BOUND = prompt_bound("user: one two three")
USED_PER_CALL, RESERVED_PER_CALL = 6, 8 + PROMPT_BOUND


def test_budget_is_exact_under_30_concurrent_calls(live, make_key):
    budget = 5 * RESERVED_PER_CALL
    key = make_key(max_tokens_total=budget)

    with ThreadPoolExecutor(max_workers=30) as pool:
        replies = list(pool.map(lambda _: live.post("/v1/chat/completions", key, json=ASK), range(30)))

    ok = [r for r in replies if r.status_code == 200]
    refused = [r for r in replies if r.status_code != 200]
    codes = [(r.status_code, error_of(r)["code"]) for r in refused]
    assert set(codes) <= {(429, "token_budget_exhausted")}, codes  # never a spurious 503 key_busy
    # Admitted only while a whole reservation fitted; settling freed room for more.
    assert budget // RESERVED_PER_CALL <= len(ok) <= budget // USED_PER_CALL
    row = key_row(key)
    assert row.tokens_used == USED_PER_CALL * len(ok) == sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert row.tokens_used <= budget
    assert row.calls_used == len(ok)
    jobs = Job.objects.filter(api_key=row)
    assert jobs.count() == len(ok) and all(job.tokens_settled for job in jobs)


def test_a_spent_budget_stops_every_kind_of_call(live, make_key):
    key = make_key(max_tokens_total=3 + PROMPT_BOUND)
    assert live.post("/v1/chat/completions", key, json={**ASK, "max_tokens": 3}).status_code == 200
    assert key_row(key).tokens_used == 6
    ApiKey.objects.filter(id=key_row(key).id).update(tokens_used=3 + PROMPT_BOUND)  # spent

    chat = live.post("/v1/chat/completions", key, json={**ASK, "max_tokens": 1})
    seed_api = live.post("/api/", key, json={"text": "hello", "model": "echo"})
    embeddings = live.post("/v1/embeddings", key, json={"model": "minilm", "input": "hello"})
    for reply in (chat, seed_api, embeddings):
        assert reply.status_code == 429, reply.text
        assert error_of(reply)["code"] == "token_budget_exhausted"
    assert key_row(key).calls_used == 1


def test_a_request_larger_than_what_is_left_is_refused_but_a_smaller_one_passes(live, make_key):
    budget = 4 + PROMPT_BOUND
    key = make_key(max_tokens_total=budget)
    too_big = live.post("/v1/chat/completions", key, json={**ASK, "max_tokens": 5})
    assert too_big.status_code == 429
    assert f"{budget} of its {budget} tokens left" in error_of(too_big)["message"]
    assert live.post("/v1/chat/completions", key, json={**ASK, "max_tokens": 4}).status_code == 200
    assert key_row(key).tokens_used == 6


def test_a_long_prompt_cannot_overspend_a_small_budget(live, make_key):
    """The prompt is reserved before the call runs: 49,000 words do not fit in 200."""
    key = make_key(max_tokens_total=200)
    long_prompt = {**ASK, "messages": [{"role": "user", "content": "word " * 390}]}  # under max_input_chars
    reply = live.post("/v1/chat/completions", key, json=long_prompt)
    assert (reply.status_code, error_of(reply)["code"]) == (429, "token_budget_exhausted")
    completion = live.post("/v1/completions", key, json={"model": "words", "prompt": "é" * 400, "max_tokens": 1})
    assert completion.status_code == 429  # 400 characters, 800 bytes: bounded by bytes, not characters
    seed_api = live.post("/api/", key, json={"text": "x" * 1990, "model": "echo"})
    assert seed_api.status_code == 429
    row = key_row(key)
    assert (row.tokens_used, row.calls_used) == (0, 0) and not Job.objects.filter(api_key=row).exists()
    assert live.post("/v1/chat/completions", key, json=ASK).status_code == 200  # a short one fits


def test_failed_calls_release_their_reservation(live, make_key):
    key = make_key(max_tokens_total=10_000)
    reply = live.post("/v1/chat/completions", key, json={"model": "boom", "messages": ASK["messages"]})
    assert reply.status_code == 500
    row = key_row(key)
    assert (row.tokens_used, row.calls_used) == (0, 0)


def test_forbidden_model_costs_nothing(live, make_key):
    key = make_key(max_tokens_total=1000, allowed_models=["echo"])
    reply = live.post("/v1/chat/completions", key, json=ASK)
    assert reply.status_code == 403
    row = key_row(key)
    assert (row.tokens_used, row.calls_used) == (0, 0)


def test_usage_endpoint_reports_tokens(live, make_key):
    key = make_key(max_tokens_total=1000)
    live.post("/v1/chat/completions", key, json=ASK)
    body = live.get("/api/usage/", key).json()
    assert body["key"]["tokens_used"] == USED_PER_CALL
    assert body["key"]["tokens_left"] == 1000 - USED_PER_CALL
    assert body["days"][0]["prompt_tokens"] == 3
    assert body["days"][0]["completion_tokens"] == 3
