"""The typed request bodies, in-process and pure: what a good body becomes, and which
problem of a bad one is reported. (Every error code and `param` of a bad body, as the
views answer it, is in test_bad_requests.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from djangollmapi.config import parse_config
from djangollmapi.errors import ApiError
from djangollmapi.routes import LocalRoute
from djangollmapi.wire import param_of
from gateway.protocol import forwarded, requests
from llmjobs.models import Job

CONFIG = parse_config(
    {"deployments": [{"name": "words", "algorithm": "algorithms.echo:Echo", "options": {"max_new_tokens": 50}}]},
    "<test>",
    base_dir=Path("/tmp"),
)
ROUTE = LocalRoute(CONFIG.deployment("words"), timeout_s=30)
LIMIT = 2000
CHAT = {"model": "words", "messages": [{"role": "user", "content": "hi"}]}


def chat(**changes):
    return requests.parse_chat({**CHAT, **changes}, ROUTE, LIMIT)


def refusal(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


def test_max_tokens_defaults_to_the_deployments_cap_and_is_capped_by_it():
    assert chat().request.max_tokens == 50
    assert chat(max_tokens=7).request.max_tokens == 7
    assert chat(max_tokens=500).request.max_tokens == 50
    assert chat(max_completion_tokens=3, max_tokens=9).reserve_tokens == 3  # the newer name wins


def test_sampling_values_reach_the_models_request():
    request = chat(temperature=0.7, top_p=0.9, seed=42, stop="END").request
    assert (request.temperature, request.top_p, request.seed, request.stop) == (0.7, 0.9, 42, ("END",))
    greedy = chat(temperature=1.0, top_p=0).request  # only the most likely token survives
    assert (greedy.temperature, greedy.top_p) == (0.0, None)


def test_null_counts_as_absent_and_unknown_fields_are_ignored():
    call = chat(temperature=None, stream=None, max_tokens=None, tools=[{"type": "function"}], metadata={"a": 1})
    assert (call.request.temperature, call.stream, call.request.max_tokens) == (None, False, 50)


def test_chat_content_parts_are_joined_and_a_null_content_is_empty():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": "hi", "name": "ann"},
    ]
    call = chat(messages=messages)
    assert call.request.messages == (
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "hi"},
    )
    assert call.input_text == "system: be brief\nassistant: \nuser: hi"


def test_usage_chunk_only_for_a_stream_that_asks():
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True).include_usage
    # Without a stream the options are not read at all, as before.
    assert not chat(stream_options={"include_usage": "yes"}).include_usage


def test_the_first_problem_of_a_body_is_reported_input_first():
    error = refusal(lambda: chat(messages=[], temperature="hot"))
    assert (error.param, error.code) == ("messages", "invalid_type")


def test_a_completion_prompt_may_be_a_list_of_one():
    call = requests.parse_completion({"model": "words", "prompt": ["a b"], "max_tokens": 2}, ROUTE, LIMIT)
    assert (call.kind, call.request.prompt, call.request.messages, call.reserve_tokens) == (
        Job.Kind.COMPLETION,
        "a b",
        None,
        2,
    )
    assert call.payload() == {"request": call.request.as_payload(), "stream": False}


def test_the_size_limit_counts_the_whole_chat():
    long = [{"role": "user", "content": "x" * 1000}, {"role": "user", "content": "y" * 1000}]
    error = refusal(lambda: chat(messages=long))
    assert (error.code, error.param) == ("input_too_long", "messages")


def test_embeddings_take_a_string_or_a_list():
    one = requests.parse_embeddings({"model": "m", "input": "solo"}, LIMIT)
    assert (one.texts, one.encoding_format, one.payload()) == (("solo",), "float", {"input": ["solo"]})
    many = requests.parse_embeddings({"model": "m", "input": ["a", "b"], "encoding_format": "base64"}, LIMIT)
    assert (many.texts, many.encoding_format, many.input_text) == (("a", "b"), "base64", "a\nb")


def test_tokenize_reads_messages_then_prompt_then_input():
    chat_call = requests.parse_tokenize({"model": "m", "messages": CHAT["messages"], "input": "ignored"}, LIMIT)
    assert (chat_call.request.messages, chat_call.input_text) == (({"role": "user", "content": "hi"},), "user: hi")
    prompt_call = requests.parse_tokenize({"model": "m", "prompt": "p", "input": "i"}, LIMIT)
    assert (prompt_call.request.prompt, prompt_call.input_text) == ("p", "p")
    assert requests.parse_tokenize({"model": "m", "input": "i"}, LIMIT).request.prompt == "i"


def test_the_model_name_is_read_alone_first():
    assert requests.model_name({"model": "words", "messages": "not even a list"}) == "words"
    error = refusal(lambda: requests.model_name({"messages": []}))
    assert (error.code, error.param) == ("missing_parameter", "model")


def test_an_upstream_body_goes_through_untouched_but_for_the_model_and_usage():
    data = {**CHAT, "tools": [{"type": "function"}], "temperature": "the provider judges", "stream": True}
    call = forwarded.parse_upstream("chat", data, default_reserve=1024, max_input_chars=LIMIT)
    assert (call.stream, call.include_usage, call.reserve_tokens) == (True, False, 1024)
    body = call.body_for("their-name")
    assert body == {**data, "model": "their-name", "stream_options": {"include_usage": True}}
    assert data["model"] == "words"  # the client's body itself is not changed
    assert forwarded.parse_upstream("chat", {**CHAT, "max_tokens": 9}, 1024, LIMIT).reserve_tokens == 9


def test_upstream_embeddings_reserve_nothing_and_never_stream():
    call = forwarded.parse_upstream("embeddings", {"model": "m", "input": ["a"], "stream": "x"}, 1024, LIMIT)
    assert (call.stream, call.reserve_tokens, call.input_text) == (False, 0, '["a"]')


@pytest.mark.parametrize(
    "loc, below, param",
    [
        ((), "", None),
        (("model",), "", "model"),
        (("messages", 0, "role"), "", "messages[0].role"),
        (("messages", 0, "content"), "[2]", "messages[0].content[2]"),
        ((), "stream_options.x", "stream_options.x"),
    ],
)
def test_the_param_is_the_errors_location(loc, below, param):
    assert param_of(loc, below) == param


def test_with_the_newer_name_given_max_tokens_is_not_read():
    assert chat(max_completion_tokens=5, max_tokens="anything").reserve_tokens == 5
    call = forwarded.parse_upstream("chat", {**CHAT, "max_completion_tokens": 5, "max_tokens": 0}, 1024, LIMIT)
    assert call.reserve_tokens == 5


def test_tokenize_reads_no_field_it_does_not_use():
    assert requests.parse_tokenize({"model": "m", "prompt": "hi", "input": 5}, LIMIT).input_text == "hi"
    messages_call = requests.parse_tokenize({"model": "m", "messages": CHAT["messages"], "prompt": 5}, LIMIT)
    assert messages_call.input_text == "user: hi"


def test_an_empty_encoding_format_means_floats():
    assert (
        requests.parse_embeddings({"model": "m", "input": "x", "encoding_format": ""}, LIMIT).encoding_format == "float"
    )


@pytest.mark.parametrize(
    "kind, body, param",
    [
        ("local", {"n": 2, "stream": "yes"}, "n"),
        ("local", {"temperature": "hot", "stream": "yes"}, "temperature"),
        ("local", {"max_tokens": 0, "n": 2}, "max_tokens"),
        ("upstream", {"messages": "x", "stream": "yes"}, "messages"),
        ("upstream", {"stream": "yes", "max_tokens": "x"}, "stream"),
    ],
)
def test_of_several_problems_the_one_reported_is_the_one_reported_before(kind, body, param):
    data = {**CHAT, **body}
    if kind == "local":
        error = refusal(lambda: requests.parse_chat(data, ROUTE, LIMIT))
    else:
        error = refusal(lambda: forwarded.parse_upstream("chat", data, 1024, LIMIT))
    assert error.param == param
