"""One device runs one job at a time; different devices run at the same time; a
worker builds each model once."""

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from llmjobs.models import Job

pytestmark = pytest.mark.django_db(transaction=True)


def post_all(live, key, models):
    def call(model):
        response = requests.post(
            f"{live.url}/api/",
            headers={"Authorization": f"Bearer {key}"},
            json={"text": "x", "model": model},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.json()["message"]

    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        return list(pool.map(call, models))


def overlaps(a, b):
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_eight_jobs_on_one_device_never_overlap(live, key):
    runs = sorted(post_all(live, key, ["delay-cpu1"] * 8), key=lambda run: run["start"])
    assert len({run["pid"] for run in runs}) == 1
    for earlier, later in itertools.pairwise(runs):
        assert earlier["end"] <= later["start"], runs
    rows = sorted(Job.objects.filter(model="delay-cpu1"), key=lambda job: job.started_at)
    for earlier, later in itertools.pairwise(rows):
        assert earlier.finished_at <= later.started_at


def test_two_devices_run_in_parallel(live, key):
    a, b = post_all(live, key, ["delay-cpu", "delay-cpu1"])
    assert a["pid"] != b["pid"]
    assert overlaps(a, b), (a, b)


def test_model_is_built_once_per_worker_process(live, key):
    pids = {message["pid"] for message in post_all(live, key, ["counting"] * 5)}
    constructions = (live_data_dir() / "constructions.log").read_text().split()
    assert len(pids) == 1
    assert constructions.count(str(pids.pop())) == 1


def live_data_dir():
    from django.conf import settings

    return settings.LLM_CONFIG.server.data_dir
