"""The demo model, end to end: the real SmolLM2 answers through the live server."""

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_demo_model_knows_the_capital_of_france(live, key, smollm2_worker):
    response = live.post("/api/", key, json={"text": "What is the capital of France?", "model": smollm2_worker})
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["message"]
