"""`GET /api/usage/`: calls and characters per day, quota left, window."""

import pytest
from django.utils import timezone

pytestmark = pytest.mark.django_db(transaction=True)


def test_usage_counts_calls_and_characters(live, make_key):
    key = make_key(max_calls=10)
    live.post("/api/", key, json={"text": "abc", "model": "echo"})
    live.post("/api/", key, json={"text": "defgh", "model": "echo"})
    live.post("/api/", key, json={"text": "x", "model": "boom"})  # refunded

    body = live.get("/api/usage/", key).json()

    assert body["key"]["calls_used"] == 2
    assert body["key"]["calls_left"] == 8
    assert body["key"]["max_calls"] == 10
    (today,) = body["days"]
    assert today["day"] == timezone.now().date().isoformat()
    assert (today["calls"], today["requests"]) == (2, 3)
    assert today["input_chars"] == 9
    assert today["output_chars"] == 8
