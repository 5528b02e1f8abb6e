"""The seed's own client example, against the live server and the real worker."""

import pytest
import requests

from llmjobs.models import Job
from tests.helpers import key_row

pytestmark = pytest.mark.django_db(transaction=True)


def test_seed_client_example_gets_text_from_the_test_model(live, key):
    header = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    data = {"text": "This could be any payload data the api expects."}

    response = requests.post(f"{live.url}/api/", headers=header, json=data, timeout=60)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-gpt2"
    assert isinstance(body["message"], str) and body["message"]
    job = Job.objects.get(id=body["job_id"])
    assert job.status == Job.Status.SUCCEEDED
    assert job.output == body["message"]
    assert job.worker.startswith("dla.device.cpu@")
    assert key_row(key).calls_used == 1


def test_test_model_answers_deterministically(live, key):
    first = live.post("/api/", key, json={"text": "hello there"}).json()["message"]
    second = live.post("/api/", key, json={"text": "hello there"}).json()["message"]
    assert first == second


def test_analyze_alias_and_model_choice(live, key):
    response = live.post("/analyze/", key, json={"text": "ping", "model": "echo"})
    assert response.status_code == 200
    assert response.json()["message"] == "ping"


def test_seed_shaped_algorithm_loads_unchanged(live, key):
    response = live.post("/api/", key, json={"text": "abc", "model": "seed-shaped"})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "seed-shaped"
