"""Small helpers shared by tests (fixtures live in conftest.py)."""

from __future__ import annotations

from apikeys.models import ApiKey


def key_row(plaintext: str) -> ApiKey:
    """The database row of a plaintext key."""
    return ApiKey.objects.get(prefix=plaintext.split("_")[1])


def error_of(response) -> dict:
    """The OpenAI-shaped error body; fails the test if the shape is wrong."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "code", "param"}, body
    return body["error"]
