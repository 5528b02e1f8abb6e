"""The official `openai` SDK, unmodified, against the live server and real workers."""

from __future__ import annotations

import math
import time
import uuid

import openai
import pytest
from django.utils import timezone

from llmjobs.models import Job
from tests.helpers import key_row

pytestmark = pytest.mark.django_db(transaction=True)


def job_of(response_id: str) -> Job:
    return Job.objects.get(id=uuid.UUID(hex=response_id.split("-", 1)[1]))


def test_lists_the_models_the_key_may_use(sdk, make_key):
    everything = {m.id for m in sdk().models.list()}
    assert {"tiny-gpt2", "echo", "minilm", "smollm2"} <= everything

    limited = sdk(make_key(allowed_models=["echo", "minilm"]))
    assert sorted(m.id for m in limited.models.list()) == ["echo", "minilm"]
    assert limited.models.retrieve("echo").id == "echo"
    with pytest.raises(openai.NotFoundError):
        limited.models.retrieve("tiny-gpt2")


def test_chat_completion_reports_usage_counted_by_the_model(sdk, key):
    client = sdk(key)
    reply = client.chat.completions.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "hello there"}], max_tokens=5
    )

    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    job = job_of(reply.id)
    assert job.status == Job.Status.SUCCEEDED and job.kind == "chat"
    assert (job.prompt_tokens, job.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert key_row(key).tokens_used == reply.usage.total_tokens


def test_same_greedy_request_gives_the_same_answer(sdk, key):
    client = sdk(key)
    ask = dict(model="tiny-gpt2", messages=[{"role": "user", "content": "same"}], max_tokens=6, temperature=0)
    assert client.chat.completions.create(**ask).choices[0].message.content == (
        client.chat.completions.create(**ask).choices[0].message.content
    )


def test_stream_delivers_chunks_before_the_job_ends(sdk, key):
    client = sdk(key)
    stream = client.chat.completions.create(
        model="tiny-gpt2-long", messages=[{"role": "user", "content": "tell me"}], max_tokens=200, stream=True
    )
    first_content_at, pieces, finish, chunk_id = None, [], None, None
    for chunk in stream:
        chunk_id = chunk.id
        assert chunk.object == "chat.completion.chunk" and chunk.model == "tiny-gpt2-long"
        delta = chunk.choices[0].delta
        if delta.content:
            first_content_at = first_content_at or timezone.now()
            pieces.append(delta.content)
        finish = chunk.choices[0].finish_reason or finish

    job = job_of(chunk_id)
    assert job.status == Job.Status.SUCCEEDED
    assert first_content_at < job.finished_at  # the first token left while the model went on
    assert len(pieces) > 1
    assert "".join(pieces) == job.output["text"]
    assert finish == job.output["finish_reason"]


def test_stream_with_include_usage_ends_with_a_usage_chunk(sdk, key):
    client = sdk(key)
    chunks = list(
        client.chat.completions.create(
            model="words",
            messages=[{"role": "user", "content": "one two three four"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *content_chunks, last = chunks
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in content_chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == "one two three four"
    assert last.usage.completion_tokens == 4
    assert key_row(key).tokens_used == last.usage.total_tokens


def test_completions_with_and_without_stream(sdk, key):
    client = sdk(key)
    reply = client.completions.create(model="words", prompt="alpha beta gamma", max_tokens=2)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "alpha beta "
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 2)

    streamed = list(client.completions.create(model="tiny-gpt2", prompt="alpha beta", max_tokens=6, stream=True))
    text = "".join(c.choices[0].text for c in streamed)
    assert text == client.completions.create(model="tiny-gpt2", prompt="alpha beta", max_tokens=6).choices[0].text
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_sequence_cuts_the_answer(sdk, key):
    reply = sdk(key).completions.create(model="words", prompt="red green blue", stop=["blue"])
    assert reply.choices[0].text == "red green "
    assert reply.choices[0].finish_reason == "stop"


def test_embeddings_are_unit_vectors_and_repeatable(sdk, key):
    client = sdk(key)
    texts = ["A man is playing guitar.", "The stock market fell today.", "A man is playing guitar."]
    reply = client.embeddings.create(model="minilm", input=texts)  # the SDK asks for base64 by default

    vectors = [item.embedding for item in reply.data]
    assert [item.index for item in reply.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vectors)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    assert vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
    assert reply.usage.prompt_tokens > len(texts)

    as_floats = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    assert as_floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)


@pytest.mark.parametrize(
    "make_client, call, error",
    [
        ("bad_key", "chat", openai.AuthenticationError),
        ("limited", "chat", openai.PermissionDeniedError),
        ("used_up", "chat", openai.RateLimitError),
        ("good", "unknown_model", openai.NotFoundError),
        ("good", "bad_type", openai.BadRequestError),
    ],
)
def test_server_errors_raise_the_matching_sdk_exception(sdk, make_key, make_client, call, error):
    keys = {
        "bad_key": "dla_aaaaaaaaaaaa_" + "x" * 43,
        "limited": lambda: make_key(allowed_models=["echo"]),
        "used_up": lambda: make_key(max_calls=0),
        "good": lambda: make_key(),
    }
    key = keys[make_client]
    client = sdk(key() if callable(key) else key)
    arguments = {"model": "words", "messages": [{"role": "user", "content": "hi"}]}
    if call == "unknown_model":
        arguments["model"] = "no-such-model"
    if call == "bad_type":
        arguments["temperature"] = "hot"
    with pytest.raises(error) as raised:
        client.chat.completions.create(**arguments)
    assert raised.value.body["code"]
    if call == "bad_type":
        assert raised.value.body["param"] == "temperature"


def test_embeddings_on_a_chat_model_is_a_bad_request_and_refunded(sdk, make_key):
    key = make_key(max_calls=5)
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(key).embeddings.create(model="tiny-gpt2", input="hello")
    assert raised.value.body["code"] == "unsupported_operation"
    assert key_row(key).calls_used == 0


def test_chunks_of_a_slow_model_arrive_one_by_one(sdk, key):
    stream = sdk(key).completions.create(model="slow-stream", prompt="a b c", max_tokens=4, stream=True)
    arrivals = [time.monotonic() for chunk in stream if chunk.choices and chunk.choices[0].text]
    assert len(arrivals) == 4
    assert arrivals[-1] - arrivals[0] >= 0.2  # four words 100 ms apart were not sent as one
