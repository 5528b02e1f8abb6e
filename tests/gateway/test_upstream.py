"""Upstream providers behind our keys: a second server of ours (`gateway`) forwards
to the first (`live`, the provider) with a server-side secret."""

from __future__ import annotations

import json
import time
import uuid

import openai
import pytest
import requests
from django.utils import timezone

from djangollmapi import processes
from llmjobs.models import Job
from tests.conftest import PROVIDER_SECRET, start_web, wait_for_http
from tests.helpers import error_of, key_row, recorded, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "up-words", "messages": [{"role": "user", "content": "one two three"}]}


def post(gateway, key: str, path: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(
        f"{gateway.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30, **kwargs
    )


def sdk_for(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=30)


def jobs_of(key: str):
    return Job.objects.filter(api_key=recorded(key)).order_by("created_at")


def assert_secret_hidden(gateway, *responses: requests.Response) -> None:
    """Neither the provider's secret nor its address in a response or the gateway's log."""
    provider_address = gateway.provider_url.removeprefix("http://")
    for response in responses:
        if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            assert PROVIDER_SECRET not in response.text
            assert provider_address not in response.text
        assert all(PROVIDER_SECRET not in value for value in response.headers.values())
    log = gateway.log.read_text()
    assert PROVIDER_SECRET not in log
    assert provider_address not in log


def test_chat_through_the_gateway_records_usage_and_cost(gateway, provider_key, make_key):
    key = make_key(max_calls=5)
    reply = post(gateway, key, "/v1/chat/completions", CHAT)

    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "up-words"  # our name, not the provider's
    assert body["choices"][0]["message"]["content"] == "one two three"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert reply.headers["X-Upstream-Request-Id"]  # the provider's own job id
    (job,) = jobs_of(key)
    assert (job.backend, job.model, job.status) == ("provider", "up-words", Job.Status.SUCCEEDED)
    assert (job.prompt_tokens, job.completion_tokens) == (3, 3)
    assert float(job.cost_usd) == pytest.approx((3 * 1.0 + 3 * 2.0) / 1_000_000)
    assert str(job.id) == reply.headers["X-Request-Id"]
    row = key_row(key)
    assert (row.calls_used, row.tokens_used) == (1, 6)
    (day,) = requests.get(f"{gateway.url}/api/usage/", headers={"Authorization": f"Bearer {key}"}).json()["days"]
    assert day["cost_usd"] == pytest.approx(9 / 1_000_000)  # spend per key and day
    assert_secret_hidden(gateway, reply)


def test_the_openai_sdk_works_against_an_upstream_model(gateway, provider_key, make_key):
    client = sdk_for(gateway, make_key())
    assert {"up-words", "up-tiny", "words"} <= {m.id for m in client.models.list()}
    assert client.models.retrieve("up-words").owned_by == "provider"

    reply = client.chat.completions.create(model="up-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].message.content and reply.usage.completion_tokens <= 4

    completion = client.completions.create(model="up-words", prompt="a b c", max_tokens=2)
    assert completion.choices[0].text == "a b "

    vectors = client.embeddings.create(model="up-minilm", input=["same", "same"])
    assert len(vectors.data[0].embedding) == 384
    assert vectors.data[0].embedding == vectors.data[1].embedding
    assert vectors.usage.prompt_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model="up-words", messages=CHAT["messages"], stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three"
    assert chunks[-1].usage.total_tokens == 6
    assert {c.model for c in chunks} == {"up-words"}


def test_stream_chunks_pass_before_the_provider_finishes(gateway, provider_key, make_key):
    key = make_key()
    body = {"model": "up-slow", "prompt": "a b c d e", "max_tokens": 8, "stream": True}
    reply = post(gateway, key, "/v1/completions", body, stream=True)
    first_at, events = None, []
    for line in reply.iter_lines():
        if line.startswith(b"data: "):
            first_at = first_at or timezone.now()
            events.append(line[len(b"data: ") :])

    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)  # the usage chunk we asked for is not passed on
    assert "".join(c["choices"][0]["text"] for c in chunks) == "a b c d e a b c "  # repeated to max_tokens
    provider_job = Job.objects.filter(backend="local", model="slow-stream").latest("created_at")
    assert first_at < provider_job.finished_at  # streamed through, not buffered
    (job,) = jobs_of(key)
    assert (job.status, job.prompt_tokens, job.completion_tokens) == (Job.Status.SUCCEEDED, 5, 8)
    assert key_row(key).tokens_used == 13
    assert PROVIDER_SECRET.encode() not in b"".join(events)
    assert_secret_hidden(gateway, reply)


def test_quota_window_and_model_list_apply_to_upstream_models(gateway, provider_key, make_key):
    used_up = make_key(max_calls=0)
    assert post(gateway, used_up, "/v1/chat/completions", CHAT).status_code == 429
    limited = make_key(allowed_models=["words"])
    reply = post(gateway, limited, "/v1/chat/completions", CHAT)
    assert (reply.status_code, error_of(reply)["code"]) == (403, "model_not_allowed")
    budget = make_key(max_tokens_total=80)  # less than max_tokens 20 and the prompt's bound
    reply = post(gateway, budget, "/v1/chat/completions", {**CHAT, "max_tokens": 20})
    assert (reply.status_code, error_of(reply)["code"]) == (429, "token_budget_exhausted")


def test_upstream_down_is_a_502_within_the_connect_timeout(gateway, make_key):
    key = make_key(max_calls=3)
    started = time.monotonic()
    reply = post(gateway, key, "/v1/chat/completions", {**CHAT, "model": "up-down"})
    assert time.monotonic() - started < 1 + 2  # connect_timeout_s = 1
    error = error_of(reply)
    assert (reply.status_code, error["code"], error["type"]) == (502, "upstream_unreachable", "upstream_error")
    assert "127.0.0.1" not in error["message"]  # no internal host in the message
    (job,) = jobs_of(key)
    assert (job.status, job.refunded) == (Job.Status.FAILED, True)
    assert key_row(key).calls_used == 0


def test_upstream_slower_than_its_timeout_is_a_504(gateway, provider_key, make_key):
    key = make_key(max_calls=3)
    reply = post(gateway, key, "/v1/completions", {"model": "up-sleepy", "prompt": "a", "max_tokens": 30})
    assert (reply.status_code, error_of(reply)["code"]) == (504, "upstream_timeout")
    assert key_row(key).calls_used == 0


@pytest.mark.parametrize(
    "provider_fields, model, change, status, code",
    [
        ({}, "up-words", {"temperature": "hot"}, 400, "invalid_type"),
        ({}, "up-badkey", {}, 401, "invalid_api_key"),
        ({"allowed_models": ["words"]}, "up-echo", {}, 403, "model_not_allowed"),
        ({"max_calls": 0}, "up-words", {}, 429, "quota_exhausted"),
    ],
)
def test_provider_4xx_passes_through_in_openai_shape(
    gateway, provider_key, make_key, provider_fields, model, change, status, code
):
    provider_key(**provider_fields)
    key = make_key(max_calls=3)
    reply = post(gateway, key, "/v1/chat/completions", {**CHAT, "model": model, **change})
    assert reply.status_code == status, reply.text
    error = error_of(reply)
    assert error["code"] == code
    if code == "invalid_type":
        assert error["param"] == "temperature"
    assert error["message"].startswith("The provider 'provider")  # whose refusal it is
    # The client's own bad request costs its call; the provider's refusals do not.
    assert key_row(key).calls_used == (1 if status == 400 else 0)
    assert_secret_hidden(gateway, reply)


def test_an_absurd_max_tokens_is_refused_before_it_reaches_the_budget(gateway, provider_key, make_key):
    key = make_key(max_calls=3, max_tokens_total=1000)
    reply = post(gateway, key, "/v1/chat/completions", {**CHAT, "max_tokens": 2**63 - 1})
    assert (reply.status_code, error_of(reply)["param"]) == (400, "max_tokens")
    row = key_row(key)
    assert (row.calls_used, row.tokens_used) == (0, 0)


def test_a_provider_whose_secret_is_not_set_is_a_503_not_a_401(gateway, make_key):
    key = make_key(max_calls=3)
    reply = post(gateway, key, "/v1/chat/completions", {**CHAT, "model": "up-unset"})
    assert (reply.status_code, error_of(reply)["code"]) == (503, "upstream_not_configured")
    assert "DLA_TEST_UNSET_KEY" not in reply.text
    assert key_row(key).calls_used == 0


def test_content_parts_the_provider_judges_are_passed_through(gateway, provider_key, make_key):
    key = make_key(max_calls=3)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]}
    reply = post(gateway, key, "/v1/chat/completions", body)
    # Our own server, as the provider, refuses images: its 400 comes back as it was.
    assert (reply.status_code, error_of(reply)["param"]) == (400, "messages[0].content[1]")
    bad = post(gateway, key, "/v1/chat/completions", {**CHAT, "messages": "hi"})
    assert (bad.status_code, error_of(bad)["param"]) == (400, "messages")
    assert key_row(key).calls_used == 1  # the shape error cost nothing; the provider's 400 did


def test_provider_failure_is_a_502_and_refunded(gateway, provider_key, make_key):
    key = make_key(max_calls=3)
    reply = post(gateway, key, "/v1/chat/completions", {**CHAT, "model": "up-boom"})
    assert (reply.status_code, error_of(reply)["code"]) == (502, "upstream_error")
    assert key_row(key).calls_used == 0


def test_mid_stream_death_of_the_provider_ends_with_an_error_event(gateway, provider_key, make_key):
    mortal = start_web(gateway.mortal_port)
    try:
        wait_for_http(f"http://127.0.0.1:{gateway.mortal_port}/api/usage/", mortal)
        key = make_key(max_calls=3)
        body = {"model": "up-mortal", "prompt": "tick tock", "max_tokens": 1000, "stream": True}
        reply = post(gateway, key, "/v1/completions", body, stream=True)
        lines = reply.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith(b"data: "):
                seen += 1
                if seen == 2:
                    processes.stop(mortal, timeout_s=0)  # SIGTERM then SIGKILL: the provider dies mid-stream
                    break
        rest = [line for line in lines if line.startswith(b"data: ")]
    finally:
        processes.stop(mortal)
    last = json.loads(rest[-1][len(b"data: ") :])
    assert last["error"]["code"] == "upstream_error"
    assert b"[DONE]" not in b"".join(rest)
    (job,) = jobs_of(key)
    assert job.status == Job.Status.FAILED


def test_no_header_or_field_can_change_the_target(gateway, provider_key, make_key):
    key = make_key(max_calls=5)
    hostile = {
        "X-LLM-IP": "127.0.0.1:1",
        "X-Forwarded-Host": "evil.example",
        "Host": "127.0.0.1",
    }
    body = {**CHAT, "base_url": "http://127.0.0.1:1/v1", "api_base": "http://127.0.0.1:1", "url": "http://x"}
    headers = {"Authorization": f"Bearer {key}", **hostile}
    reply = requests.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text  # still the configured provider
    unknown = post(gateway, key, "/v1/chat/completions", {**CHAT, "model": "http://127.0.0.1:1/v1/x"})
    assert (unknown.status_code, error_of(unknown)["code"]) == (404, "model_not_found")


def test_each_call_writes_one_log_line_without_the_prompt(gateway, provider_key, make_key):
    key = make_key()
    secret_words = "zebra quokka narwhal"
    messages = [{"role": "user", "content": secret_words}]
    reply = post(gateway, key, "/v1/chat/completions", {**CHAT, "messages": messages})
    request_id = reply.headers["X-Request-Id"]
    wait_until(lambda: request_id in gateway.log.read_text(), 5, "the request's log line")
    lines = [line for line in gateway.log.read_text().splitlines() if request_id in line]
    assert len(lines) == 1
    entry = json.loads(lines[0][lines[0].index("{") :])
    assert entry["key"] == key.split("_")[1]
    assert (entry["model"], entry["backend"], entry["status"]) == ("up-words", "provider", 200)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (3, 3)
    assert entry["latency_ms"] > 0
    assert secret_words not in gateway.log.read_text()
    assert uuid.UUID(entry["request_id"])
