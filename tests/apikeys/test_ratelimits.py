"""Per-key rate limits in Redis: exact across the web processes, OpenAI's headers on
every response, tokens settled on what calls really used, requests in flight, the
official SDK's RateLimitError and retries, and Redis down (fail closed, or open)."""

from __future__ import annotations

import itertools
import logging
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import requests
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings

from apikeys import ratelimits
from apikeys.jwt_auth import create_key_for_subject
from apikeys.models import ApiKey
from llmjobs.admission import prompt_bound
from llmjobs.models import Job
from tests.gateway.test_disconnect import open_stream, read_chunks
from tests.helpers import error_of, key_row

pytestmark = pytest.mark.django_db(transaction=True)


def call(live, key: str, text: str = "hi", model: str = "echo") -> requests.Response:
    """`POST /api/` on a connection of its own, so the web workers share the calls."""
    return requests.post(
        f"{live.url}/api/", json={"text": text, "model": model}, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def test_20_requests_a_minute_let_exactly_20_of_25_through(live, make_key):
    key = make_key(rpm=20)
    with ThreadPoolExecutor(25) as pool:
        replies = list(pool.map(lambda i: call(live, key, f"c{i}"), range(25)))

    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [200] * 20 + [429] * 5
    refused = [reply for reply in replies if reply.status_code == 429]
    assert {error_of(reply)["code"] for reply in refused} == {"rate_limit_exceeded"}
    assert "20 requests per minute" in error_of(refused[0])["message"]
    waits = [int(reply.headers["retry-after-ms"]) for reply in refused]
    assert all(0 < wait <= 3000 for wait in waits)  # one call every 3 s refills
    assert all(
        reply.headers["Retry-After"] == str(-(-wait // 1000)) for reply, wait in zip(refused, waits, strict=True)
    )
    assert key_row(key).calls_used == 20 and Job.objects.count() == 20  # a refusal is no call
    time.sleep(max(waits) / 1000 + 0.05)
    assert call(live, key, "after the wait").status_code == 200
    assert call(live, key, "and no more").status_code == 429


def test_every_response_carries_openai_rate_limit_headers(live, make_key):
    key = make_key(rpm=3, tpm=10_000)
    replies = [call(live, key, f"h{i}") for i in range(4)]
    assert [reply.status_code for reply in replies] == [200, 200, 200, 429]
    remaining = [int(reply.headers["x-ratelimit-remaining-requests"]) for reply in replies]
    assert remaining == [2, 1, 0, 0]
    for reply in replies:
        assert reply.headers["x-ratelimit-limit-requests"] == "3"
        assert reply.headers["x-ratelimit-limit-tokens"] == "10000"
        assert reply.headers["x-ratelimit-reset-requests"].endswith("s")
        assert int(reply.headers["x-ratelimit-remaining-tokens"]) < 10_000
    # the bucket is full again within a minute, the time since the first call less
    assert re.fullmatch(r"5\d(\.\d+)?s|1m0s", replies[2].headers["x-ratelimit-reset-requests"])
    unlimited = call(live, make_key())
    assert unlimited.status_code == 200 and "x-ratelimit-limit-requests" not in unlimited.headers


def completion(live, key: str, max_tokens: int = 30, prompt: str = "one two three") -> requests.Response:
    body = {"model": "words", "prompt": prompt, "max_tokens": max_tokens}
    return requests.post(
        f"{live.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def test_tokens_per_minute_settle_on_what_calls_really_used(live, make_key):
    key = make_key(tpm=200)
    reserved = 30 + prompt_bound("one two three")  # max_tokens + the prompt's bound
    first = completion(live, key)
    assert first.status_code == 200
    assert int(first.headers["x-ratelimit-remaining-tokens"]) in range(200 - reserved, 200 - reserved + 2)
    used = first.json()["usage"]["total_tokens"]
    assert used < reserved

    second = completion(live, key)  # after the first settled: its real count, not its reservation
    left = int(second.headers["x-ratelimit-remaining-tokens"])
    assert 200 - used - reserved <= left <= 200 - used - reserved + 8
    too_big = completion(live, key, prompt="x" * 150)  # 214 reserved: more than the minute has left
    assert too_big.status_code == 429 and "200 tokens per minute" in error_of(too_big)["message"]


def test_two_in_flight_let_two_of_five_slow_calls_run(live, make_key):
    key = make_key(max_parallel=2)
    start = threading.Barrier(5)

    def slow(i: int) -> requests.Response:
        start.wait()
        return call(live, key, f"slow {i}", model="delay-cpu1")

    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(slow, range(5)))

    assert sorted(reply.status_code for reply in replies) == [200, 200, 429, 429, 429]
    refused = [reply for reply in replies if reply.status_code == 429]
    assert all("2 requests in flight" in error_of(reply)["message"] for reply in refused)
    ran = [reply.json()["message"] for reply in replies if reply.status_code == 200]
    assert len(ran) == 2 and Job.objects.filter(api_key=key_row(key)).count() == 2
    assert call(live, key, "after them", model="delay-cpu1").status_code == 200  # their places were freed


def test_a_per_model_limit_holds_beside_the_keys(live, make_key):
    key = make_key(rpm=100, model_limits={"words": {"rpm": 1}})
    assert call(live, key, "a", model="words").status_code == 200
    refused = call(live, key, "b", model="words")
    assert refused.status_code == 429 and "on the model 'words'" in error_of(refused)["message"]
    assert call(live, key, "c", model="echo").status_code == 200  # the key's own limit still has room


def test_the_openai_sdk_raises_rate_limit_error_and_its_retry_honours_retry_after(live, make_key):
    key = make_key(max_parallel=1)
    holder = open_stream(live, key)  # a stream in flight holds the key's one place
    read_chunks(holder, 1)

    strict = openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        strict.completions.create(model="echo", prompt="hi", max_tokens=2)
    assert refused.value.code == "rate_limit_exceeded"

    seen: list[tuple[float, int, str | None]] = []
    record = lambda r: seen.append((time.monotonic(), r.status_code, r.headers.get("retry-after-ms")))  # noqa: E731
    patient = openai.OpenAI(
        base_url=f"{live.url}/v1",
        api_key=key,
        max_retries=5,
        http_client=httpx.Client(event_hooks={"response": [record]}),
    )
    threading.Timer(1.5, holder.close).start()  # the place frees after a while
    answer = patient.completions.create(model="echo", prompt="hi", max_tokens=2)

    assert answer.choices[0].text
    assert [status for _at, status, _wait in seen][-1] == 200 and seen[0][1] == 429
    for (at, status, wait), (next_at, _s, _w) in itertools.pairwise(seen):
        assert status == 429 and next_at - at >= int(wait) / 1000 * 0.95  # it waited as told


@pytest.fixture
def dead_redis(monkeypatch):
    """The limiter's Redis at an address that refuses, or (`frozen`) accepts and never answers."""

    def point_at(port: int) -> None:
        monkeypatch.setattr(settings, "REDIS_URL", f"redis://127.0.0.1:{port}/0")
        ratelimits.client.cache_clear()
        ratelimits.script.cache_clear()

    yield point_at
    monkeypatch.undo()
    ratelimits.client.cache_clear()
    ratelimits.script.cache_clear()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("frozen", [False, True], ids=["stopped", "frozen"])
def test_redis_down_refuses_with_503_within_a_second(api, make_key, dead_redis, frozen):
    key = make_key(rpm=10)
    listener = socket.socket()
    if frozen:  # accepts connections into its backlog, answers nothing: a SIGSTOPped Redis
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        dead_redis(listener.getsockname()[1])
    else:
        dead_redis(free_port())
    try:
        started = time.monotonic()
        reply = api.post("/api/", key, json={"text": "hi", "model": "echo"})
        took = time.monotonic() - started
    finally:
        listener.close()
    assert reply.status_code == 503 and error_of(reply)["code"] == "rate_limits_unavailable"
    assert reply["Retry-After"] == "1" and took < 1.0
    assert key_row(key).calls_used == 0 and not Job.objects.exists()  # nothing charged


def test_fail_open_lets_calls_through_and_says_so(live, api, make_key, dead_redis, caplog):
    key = make_key(rpm=10)
    dead_redis(free_port())
    limits = settings.LLM_CONFIG.limits.model_copy(update={"fail_open": True})
    with (
        override_settings(LLM_CONFIG=settings.LLM_CONFIG.model_copy(update={"limits": limits})),
        caplog.at_level(logging.WARNING, logger="apikeys.ratelimits"),
    ):
        reply = api.post("/api/", key, json={"text": "hi", "model": "echo"})
    assert reply.status_code == 200
    assert "rate limits NOT enforced" in caplog.text and "fail_open" in caplog.text
    assert not Job.objects.get().rate_limited


def test_defaults_come_from_limits_and_a_keys_own_win(make_key):
    limits = settings.LLM_CONFIG.limits.model_copy(update={"rpm": 7, "max_parallel": 3})
    with override_settings(LLM_CONFIG=settings.LLM_CONFIG.model_copy(update={"limits": limits})):
        own = key_row(make_key(rpm=50))
        default = key_row(make_key())
        assert "rpm 50, tpm ∞, in flight 3" in ratelimits.key_limits_text(own)
        assert "rpm 7, tpm ∞, in flight 3" in ratelimits.key_limits_text(default)


def test_createapikey_and_jwt_keys_take_rate_limits(capsys):
    call_command("createapikey", "--name", "limited", "--rpm", "30", "--tpm", "9000", "--max-parallel", "4", "--quiet")
    row = ApiKey.objects.get(name="limited")
    assert (row.rpm, row.tpm, row.max_parallel) == (30, 9000, 4)
    jwt = settings.LLM_CONFIG.jwt.model_copy(update={"rpm": 12, "tpm": 3000})
    made = create_key_for_subject("someone@issuer.test", jwt)
    assert (made.rpm, made.tpm, made.max_parallel) == (12, 3000, None)


@pytest.mark.parametrize("flag", ["--rpm=0", "--tpm=-1", "--max-parallel=0"])
def test_createapikey_refuses_a_limit_below_one(flag):
    with pytest.raises(Exception, match="must be 1 or more"):
        call_command("createapikey", "--name", "x", flag)


@pytest.mark.parametrize(
    "value, valid",
    [
        ({}, True),
        ({"echo": {"rpm": 5, "tpm": 100, "max_parallel": 1}}, True),
        ({"echo": {"rpm": 0}}, False),
        ({"echo": {"rps": 5}}, False),
        ({"echo": {"rpm": True}}, False),
        ({"echo": {}}, False),
        ({"echo": 5}, False),
        ([], False),
    ],
)
def test_per_model_limits_are_checked(value, valid):
    from apikeys.models import valid_model_limits

    assert valid_model_limits(value) is valid


@pytest.mark.parametrize(
    "ms, text", [(0, "0ms"), (17, "17ms"), (1000, "1s"), (2500, "2.5s"), (60_000, "1m0s"), (90_500, "1m30.5s")]
)
def test_durations_read_as_openai_writes_them(ms, text):
    assert ratelimits.duration(ms) == text
