"""`/metrics`: Prometheus text summed over every process (web workers and device
workers), readable only by the scrapers `[metrics]` allows."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests
from django.conf import settings
from django.test import RequestFactory, override_settings
from prometheus_client.parser import text_string_to_metric_families

from djangollmapi.config.sections import MetricsConfig
from djangollmapi.metrics import scraper_allowed
from tests.helpers import error_of, key_row

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = {"Authorization": "Bearer test-metrics-token"}  # tests/djangollmapi.test.toml


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(scraped: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(value for (sample, got), value in scraped.items() if sample == name and wanted <= got)


def scrape(live) -> dict:
    reply = requests.get(f"{live.url}/metrics", headers=TOKEN, timeout=10)
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/plain")
    return samples(reply.text)


def test_only_allowed_scrapers_read_the_metrics(api):
    refused = api.get("/metrics")  # loopback, but a token is configured: it is needed
    assert refused.status_code == 403 and error_of(refused)["code"] == "metrics_forbidden"
    assert api.get("/metrics", headers=TOKEN).status_code == 200
    assert api.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 403


@pytest.mark.parametrize(
    ("config", "address", "allowed"),
    [
        (MetricsConfig(), "127.0.0.1", True),
        (MetricsConfig(), "::1", True),
        (MetricsConfig(), "10.1.2.3", False),
        (MetricsConfig(allow=("10.0.0.0/8",)), "10.1.2.3", True),
        (MetricsConfig(allow=("10.0.0.0/8",)), "127.0.0.1", False),
        (MetricsConfig(token="t"), "127.0.0.1", False),
    ],
)
def test_who_may_scrape(config, address, allowed):
    request = RequestFactory().get("/metrics", REMOTE_ADDR=address)
    with override_settings(LLM_CONFIG=settings.LLM_CONFIG.model_copy(update={"metrics": config})):
        assert scraper_allowed(request) is allowed


def test_counters_rise_with_calls_from_every_process(live, key):
    before = scrape(live)
    for i in range(20):  # each call on its own connection: both web workers take some
        reply = live.post("/api/", key, json={"text": f"m{i}", "model": "echo"})
        assert reply.status_code == 200
    assert live.post("/api/", key, json={"text": "x", "model": "no-such"}).status_code == 404
    stream = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert live.post("/v1/chat/completions", key, json=stream).status_code == 200
    after = scrape(live)

    def rise(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert rise("dla_http_requests_total", route="api/", status="200") == 20  # web workers
    assert rise("dla_errors_total", code="model_not_found") == 1
    assert rise("dla_jobs_total", model="echo", status="succeeded") == 20  # recorded by the worker
    assert rise("dla_job_run_seconds_count", model="echo") == 20
    assert rise("dla_request_queue_time_seconds_count", model="echo") == 20
    assert rise("dla_time_to_first_token_seconds_count", model="tiny-gpt2") == 1
    assert rise("dla_tokens_total", model="tiny-gpt2", type="completion") > 0
    assert total(after, "dla_worker_up", device="cpu") == 1
    assert ("dla_num_requests_waiting", frozenset({("device", "cuda:7")})) in after
    assert rise("dla_device_busy_seconds_total", device="cpu") > 0  # the device loop's steps


def test_limited_keys_show_what_they_have_left(live, make_key):
    limited = make_key(name="limited", max_calls=5, max_tokens_total=1000)
    make_key(name="unlimited")
    for text in ("ab", "cd"):
        assert live.post("/api/", limited, json={"text": text, "model": "echo"}).status_code == 200
    prefix = limited.split("_")[1]
    scraped = scrape(live)
    assert total(scraped, "dla_api_key_remaining_calls", key=prefix, key_alias="limited") == 3
    assert (
        total(scraped, "dla_api_key_remaining_tokens", key=prefix, key_alias="limited")
        == 1000 - key_row(limited).tokens_used
    )
    assert not [labels for (name, labels) in scraped if ("key_alias", "unlimited") in labels]


def test_metrics_switched_off_count_nothing_and_are_not_served(tmp_path):
    """`[metrics] enabled = false`, in a process of its own (the switch is read once)."""
    config = tmp_path / "off.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[metrics]\nenabled = false\n')
    script = (
        "import django; django.setup()\n"
        "from django.test import RequestFactory\n"
        "from djangollmapi import metrics\n"
        "assert isinstance(metrics.REQUESTS, metrics.NoMetric)\n"
        "metrics.JOBS.labels('m', 'succeeded', '').inc()\n"
        "print(metrics.metrics_view(RequestFactory().get('/metrics')).status_code)\n"
    )
    env = {**os.environ, "DJANGO_LLM_API_CONFIG": str(config), "DJANGO_SETTINGS_MODULE": "djangollmapi.settings"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "404"
    assert not list((tmp_path / "metrics").glob("*.db"))  # no process wrote a counter file
