"""Bad input on /v1 gets an OpenAI-shaped 4xx naming its `param`, costs no call, and
never a 500, a hang or a traceback. What is decided before a job reaches a worker is
tested in-process (`api`); what a worker does, against the live stack."""

from __future__ import annotations

import json

import openai
import pytest

from tests.helpers import error_of, key_row

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "words", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "change, param, code",
    [
        ({"model": None}, "model", "missing_parameter"),
        ({"model": 7}, "model", "invalid_type"),
        ({"messages": "hi"}, "messages", "invalid_type"),
        ({"messages": []}, "messages", "invalid_type"),
        ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
            "unsupported_content",
        ),
        ({"messages": [{"role": "user", "content": "a\u0000b"}]}, "messages[0].content", "invalid_value"),
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"temperature": 2.5}, "temperature", "invalid_value"),
        ({"temperature": True}, "temperature", "invalid_type"),
        ({"top_p": 1.5}, "top_p", "invalid_value"),
        ({"max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"max_tokens": "5"}, "max_tokens", "invalid_type"),
        ({"max_tokens": 2**70}, "max_tokens", "invalid_value"),
        ({"max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({"max_completion_tokens": -1}, "max_completion_tokens", "invalid_value"),
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"stream": True, "stream_options": {"include_usage": "y"}}, "stream_options.include_usage", "invalid_type"),
        ({"n": 2}, "n", "unsupported_parameter"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"stop": 3}, "stop", "invalid_type"),
        ({"seed": "x"}, "seed", "invalid_type"),
        ({"user": 1}, "user", "invalid_type"),
    ],
)
def test_chat_parameter_errors_name_the_param(api, make_key, change, param, code):
    key = make_key(max_calls=3)
    reply = api.post("/v1/chat/completions", key, json={**CHAT, **change})
    assert reply.status_code == 400, reply.text
    error = error_of(reply)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert key_row(key).calls_used == 0


@pytest.mark.parametrize(
    "change, param", [({"temperature": "hot"}, "temperature"), ({"messages": [{"role": "robot"}]}, "messages[0].role")]
)
def test_the_live_server_names_the_param_too(live, make_key, change, param):
    key = make_key(max_calls=3)
    reply = live.post("/v1/chat/completions", key, json={**CHAT, **change})
    assert (reply.status_code, error_of(reply)["param"]) == (400, param)
    assert key_row(key).calls_used == 0


def test_unknown_parameters_are_ignored(live, key):
    body = {**CHAT, "frequency_penalty": 0.5, "tools": [], "metadata": {"a": 1}, "something_new": True}
    assert live.post("/v1/chat/completions", key, json=body).status_code == 200


def test_text_content_parts_are_joined(live, key):
    content = [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]
    reply = live.post("/v1/chat/completions", key, json={**CHAT, "messages": [{"role": "user", "content": content}]})
    assert reply.json()["choices"][0]["message"]["content"] == "one two"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"model": "words"}, "prompt"),
        ("/v1/completions", {"model": "words", "prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {"model": "words", "prompt": "x", "echo": True}, "echo"),
        ("/v1/embeddings", {"model": "minilm", "input": []}, "input"),
        ("/v1/embeddings", {"model": "minilm", "input": [1, 2]}, "input"),
        ("/v1/embeddings", {"model": "minilm", "input": ["ok", ""]}, "input[1]"),
        ("/v1/embeddings", {"model": "minilm", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ("/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 8}, "dimensions"),
        ("/v1/tokenize", {"model": "tiny-gpt2"}, "input"),
    ],
)
def test_other_endpoints_name_the_bad_param(api, make_key, path, body, param):
    key = make_key(max_calls=3)
    reply = api.post(path, key, json=body)
    assert reply.status_code == 400, reply.text
    assert error_of(reply)["param"] == param
    assert key_row(key).calls_used == 0


def test_input_over_the_size_limit_is_refused(api, key):
    reply = api.post("/v1/completions", key, json={"model": "words", "prompt": "x" * 2001})
    assert reply.status_code == 400
    assert error_of(reply)["code"] == "input_too_long"


def test_body_that_is_not_a_json_object(api, key):
    as_json = {"Content-Type": "application/json"}
    not_json = api.post("/v1/chat/completions", key, data=b"{nope", headers=as_json)
    assert (not_json.status_code, error_of(not_json)["code"]) == (400, "invalid_json")
    a_list = api.post("/v1/chat/completions", key, data=json.dumps([CHAT]), headers=as_json)
    assert (a_list.status_code, error_of(a_list)["code"]) == (400, "invalid_body")


def test_a_bad_key_is_reported_before_a_bad_body(api):
    reply = api.post("/v1/chat/completions", "dla_aaaaaaaaaaaa_" + "x" * 43, json={"model": 7})
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"


def test_listing_models_needs_a_key(api):
    reply = api.get("/v1/models")
    assert reply.status_code == 401
    assert error_of(reply)["code"] == "missing_api_key"


def test_unknown_v1_path_is_a_json_404(api, key):
    reply = api.post("/v1/images/generations", key, json={})
    assert reply.status_code == 404
    assert error_of(reply)["type"] == "not_found_error"


def test_stream_to_a_model_without_worker_fails_before_streaming(api, key):
    reply = api.post("/v1/chat/completions", key, json={**CHAT, "model": "orphan", "stream": True})
    assert reply.status_code == 503
    assert reply.headers["Content-Type"] == "application/json"
    assert error_of(reply)["code"] == "no_worker"


def test_a_job_failing_mid_stream_ends_with_an_error_event(sdk, make_key):
    key = make_key(max_calls=5)
    stream = sdk(key).chat.completions.create(model="boom", messages=CHAT["messages"], stream=True)
    with pytest.raises(openai.APIError) as raised:
        list(stream)
    assert "failed" in str(raised.value)
    assert key_row(key).calls_used == 0  # a server fault is refunded


def test_a_stream_past_its_deadline_ends_with_a_timeout_event(live, key):
    reply = live.post(
        "/v1/completions", key, json={"model": "sleepy-stream", "prompt": "a b c", "stream": True}, stream=True
    )
    events = [line for line in reply.iter_lines() if line.startswith(b"data: ")]
    assert json.loads(events[-1][len(b"data: ") :])["error"]["code"] == "job_timeout"
