"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from apikeys.models import ApiKey
from tests.leaks import assert_no_secret

T = TypeVar("T")


def key_row(plaintext: str) -> ApiKey:
    """The database row of a plaintext key."""
    return ApiKey.objects.get(prefix=plaintext.split("_")[1])


def recorded(plaintext: str, timeout_s: float = 10) -> ApiKey:
    """The key's row once every upstream answer it got is in the database: a provider's
    answer is recorded behind it (`[server] write_behind`, llmjobs.journal), a few
    milliseconds after the client has it."""
    from llmjobs.models import Job

    api_key = key_row(plaintext)
    pending = Job.objects.filter(api_key=api_key, status=Job.Status.RUNNING).exclude(backend="local")
    wait_until(lambda: not pending.exists(), timeout_s, "the key's upstream answers to be recorded")
    return key_row(plaintext)


def error_of(response) -> dict:
    """The OpenAI-shaped error body; fails the test if the shape is wrong or the body
    holds a secret the suite knows (tests/leaks.py)."""
    assert_no_secret(response.content.decode(errors="replace"), "the error body")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "code", "param"}, body
    return body["error"]


def wait_until(check: Callable[[], T], timeout_s: float = 20, what: str = "the condition") -> T:
    """Poll `check` until it returns something truthy, and return that; fail the test
    after `timeout_s`. The one way tests wait for another process to act."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s:g} s (last: {value!r})")
        time.sleep(0.02)


@dataclass
class CheckedChat:
    """A checked chat request as a view hands it to the job lifecycle
    (`llmjobs.admission.JobRequest`), for tests that make jobs in-process."""

    reserve_tokens: int = 8
    input_text: str = "user: hi"
    kind: str = "chat"

    def payload(self) -> dict:
        return {}
