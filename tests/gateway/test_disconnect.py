"""A client that goes away mid-stream frees the device: its job is cancelled, the
tokens made so far are recorded and charged, and the next job starts at once."""

from __future__ import annotations

import json
import uuid

import pytest
import requests
from django.utils import timezone

from llmjobs.models import Job
from tests.helpers import key_row, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN_STEP_S = 0.1  # slow-stream's token_delay_ms


def open_stream(live, key: str, max_tokens: int = 100_000) -> requests.Response:
    body = {"model": "slow-stream", "prompt": "tick tock", "max_tokens": max_tokens, "stream": True}
    response = requests.post(
        f"{live.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, stream=True, timeout=30
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return response


def read_chunks(response: requests.Response, count: int) -> list[dict]:
    """The next `count` data chunks. One line iterator per response: dropping a
    half-read one makes urllib3 close the connection, a disconnect of its own."""
    if not hasattr(response, "lines"):
        response.lines = response.iter_lines()
    chunks = []
    for line in response.lines:
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunks.append(json.loads(line[len(b"data: ") :]))
            if len(chunks) == count:
                return chunks
    raise AssertionError(f"stream ended after {len(chunks)} chunks")


def job_from_chunk(chunk: dict) -> Job:
    return Job.objects.get(id=uuid.UUID(hex=chunk["id"].split("-", 1)[1]))


def wait_for_status(job_id, status: str, timeout_s: float = 10) -> Job:
    def reached() -> Job | None:
        job = Job.objects.get(id=job_id)
        return job if job.status == status and (job.tokens_settled or status != Job.Status.CANCELLED) else None

    return wait_until(reached, timeout_s, f"job {job_id} {status}")


def test_closing_a_stream_cancels_its_job_and_frees_the_device(live, make_key):
    key = make_key()
    stream = open_stream(live, key)
    chunks = read_chunks(stream, 3)
    stream.close()
    closed_at = timezone.now()
    next_reply = live.post(
        "/v1/completions", key, json={"model": "slow-stream", "prompt": "next", "max_tokens": 1}
    )  # queued behind the abandoned job on the same device

    cancelled = wait_for_status(job_from_chunk(chunks[0]).id, Job.Status.CANCELLED)
    assert 3 <= cancelled.completion_tokens <= 3 + 3  # stopped within a token step or two of the close
    assert cancelled.prompt_tokens == 2
    assert next_reply.status_code == 200, next_reply.text
    following = Job.objects.get(id=uuid.UUID(hex=next_reply.json()["id"].split("-", 1)[1]))
    # It started once the device was free: a few token steps after the close, not the
    # ~10,000 s the abandoned job had asked for.
    assert (following.started_at - closed_at).total_seconds() < 10 * TOKEN_STEP_S
    assert following.started_at >= cancelled.finished_at
    # What the abandoned job made is charged, nothing more; the call is not refunded.
    row = key_row(key)
    assert row.tokens_used == cancelled.total_tokens + following.total_tokens
    assert row.calls_used == 2


def test_closing_a_queued_stream_means_it_never_runs(live, make_key):
    key = make_key(max_tokens_total=1_000_000)
    busy = open_stream(live, key)
    read_chunks(busy, 1)
    waiting = open_stream(live, key)  # queued behind `busy` on the same device
    waiting_id = waiting.headers["X-Request-Id"]
    assert Job.objects.get(id=waiting_id).status == Job.Status.QUEUED
    waiting.close()

    job = wait_for_status(waiting_id, Job.Status.CANCELLED)
    busy.close()
    busy_job = wait_for_status(busy.headers["X-Request-Id"], Job.Status.CANCELLED)
    assert job.started_at is None and job.completion_tokens is None
    assert job.tokens_settled
    assert key_row(key).tokens_used == busy_job.total_tokens  # the queued one's reservation is back
