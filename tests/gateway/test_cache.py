"""The response cache: an identical deterministic call is answered from Redis with
`x-cache: hit`, without reaching the worker or the provider, and still recorded as a
call (or given back, where hits do not count); per key unless shared."""

from __future__ import annotations

import pytest
import requests

from llmjobs.models import Job
from tests.helpers import key_row

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "words-cached", "messages": [{"role": "user", "content": "one two three"}], "temperature": 0}


def post(url: str, key: str, path: str, body: dict) -> requests.Response:
    return requests.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_an_identical_call_at_temperature_0_is_answered_from_the_cache(live, make_key):
    key = make_key()
    first = post(live.url, key, "/v1/chat/completions", CHAT)
    again = post(live.url, key, "/v1/chat/completions", {**CHAT, "user": "someone"})  # `user` changes nothing

    assert (first.status_code, first.headers["x-cache"]) == (200, "miss")
    assert (again.status_code, again.headers["x-cache"]) == (200, "hit")
    assert again.json()["choices"] == first.json()["choices"] and again.json()["usage"] == first.json()["usage"]
    assert again.json()["id"] != first.json()["id"]  # a call of its own
    jobs = {job.backend: job for job in Job.objects.filter(api_key=key_row(key))}
    assert set(jobs) == {"local", "cache"}  # the hit never reached the worker
    assert jobs["cache"].status == Job.Status.SUCCEEDED and jobs["cache"].queue == ""
    assert jobs["cache"].worker.startswith("web@")  # the web process that answered it
    assert again.headers["X-Request-Id"] == str(jobs["cache"].id)
    row = key_row(key)
    assert row.calls_used == 2 and row.tokens_used == 2 * first.json()["usage"]["total_tokens"]  # hits count


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.7},  # sampled: never cached
        {"temperature": None},  # the deployment's own temperature
        {"stream": True},  # streams are not cached
    ],
)
def test_calls_that_may_differ_are_never_cached(live, make_key, change):
    key = make_key()
    body = {k: v for k, v in {**CHAT, **change}.items() if v is not None}
    replies = [post(live.url, key, "/v1/chat/completions", body) for _ in range(2)]
    assert all(reply.status_code == 200 and "x-cache" not in reply.headers for reply in replies)
    assert set(Job.objects.filter(api_key=key_row(key)).values_list("backend", flat=True)) == {"local"}


def test_another_question_or_another_key_is_a_miss(live, make_key):
    first, second = make_key(), make_key()
    assert post(live.url, first, "/v1/chat/completions", CHAT).headers["x-cache"] == "miss"
    other = {**CHAT, "messages": [{"role": "user", "content": "one two four"}]}
    assert post(live.url, first, "/v1/chat/completions", other).headers["x-cache"] == "miss"
    assert post(live.url, first, "/v1/chat/completions", {**CHAT, "max_tokens": 2}).headers["x-cache"] == "miss"
    assert post(live.url, second, "/v1/chat/completions", CHAT).headers["x-cache"] == "miss"  # per key
    assert post(live.url, second, "/v1/chat/completions", CHAT).headers["x-cache"] == "hit"


def test_cached_answers_expire_with_their_ttl(live, make_key):
    key = make_key()
    post(live.url, key, "/v1/completions", {"model": "words-cached", "prompt": "a b", "temperature": 0})
    (slot,) = live.redis.keys(f"dla:cache:{key.split('_')[1]}:*")
    assert 0 < live.redis.pttl(slot) <= 60_000


def test_a_shared_upstream_cache_answers_every_key_without_the_provider(gateway, provider_key, make_key):
    """`provider-cached`: shared between keys, and its hits do not count as calls."""
    first, second = make_key(), make_key(max_calls=1)
    body = {"model": "up-cached", "messages": [{"role": "user", "content": "a b c"}], "temperature": 0}
    miss = post(gateway.url, first, "/v1/chat/completions", body)
    provider_jobs = Job.objects.filter(api_key__name="provider").count()

    hit = post(gateway.url, second, "/v1/chat/completions", body)
    hit_again = post(gateway.url, second, "/v1/chat/completions", body)

    assert miss.headers["x-cache"] == "miss" and hit.headers["x-cache"] == hit_again.headers["x-cache"] == "hit"
    assert hit.json()["choices"] == miss.json()["choices"] and hit.json()["model"] == "up-cached"
    assert Job.objects.filter(api_key__name="provider").count() == provider_jobs  # the provider saw neither
    row = key_row(second)
    assert (row.calls_used, row.tokens_used) == (0, 0)  # hits given back: two of a one-call quota
    jobs = Job.objects.filter(api_key=row)
    assert jobs.count() == 2 and all(job.backend == "cache" and job.refunded for job in jobs)


def test_embeddings_are_cached_and_errors_never(live, make_key):
    key = make_key()
    body = {"model": "minilm-cached", "input": ["hello", "world"]}
    first = post(live.url, key, "/v1/embeddings", body)
    again = post(live.url, key, "/v1/embeddings", body)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert again.json()["data"] == first.json()["data"] and again.json()["usage"] == first.json()["usage"]
    as_base64 = post(live.url, key, "/v1/embeddings", {**body, "encoding_format": "base64"})
    assert as_base64.status_code == 200 and isinstance(as_base64.json()["data"][0]["embedding"], str)

    kept = set(live.redis.keys(f"dla:cache:{key.split('_')[1]}:*"))
    wrong = {"model": "words-cached", "input": "hello"}  # words-cached cannot embed
    assert [post(live.url, key, "/v1/embeddings", wrong).status_code for _ in range(2)] == [400, 400]
    assert set(live.redis.keys(f"dla:cache:{key.split('_')[1]}:*")) == kept  # an error is not kept
