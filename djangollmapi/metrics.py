"""`/metrics`: Prometheus text format, summed over every process of this instance
(prometheus-client's multiprocess mode: each gunicorn worker and each device worker
writes its own files under `PROMETHEUS_MULTIPROC_DIR`, set in settings), plus what the
device workers publish about their queues, read from Redis when scraped.

Named after what operators know: vLLM's `num_requests_waiting` / `_running`,
`time_to_first_token_seconds`, `request_queue_time_seconds`; everything prefixed
`dla_`. Only scrapers the `[metrics]` section allows get them.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache

# The settings set PROMETHEUS_MULTIPROC_DIR, which prometheus_client reads when imported.
assert settings.METRICS_DIR

from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402

from djangollmapi.errors import error_response  # noqa: E402

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("dla_http_requests", "API requests, by route, status and model.", ["route", "status", "model"])
REQUEST_SECONDS = Histogram(
    "dla_http_request_duration_seconds",
    "API request latency (a stream: to its end).",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
ERRORS = Counter("dla_errors", "Error answers by code (rejections, limits, failures).", ["code"])
TIME_TO_FIRST_TOKEN = Histogram(
    "dla_time_to_first_token_seconds", "Streamed requests: request to first token.", ["model"], buckets=LATENCY_BUCKETS
)
TOKENS = Counter("dla_tokens", "Tokens of finished calls, by model and type (prompt, completion).", ["model", "type"])
JOBS = Counter("dla_jobs", "Ended jobs (calls), by model, status and error code.", ["model", "status", "code"])
QUEUE_SECONDS = Histogram(
    "dla_request_queue_time_seconds", "Local jobs: sent to started on the device.", ["model"], buckets=LATENCY_BUCKETS
)
RUN_SECONDS = Histogram("dla_job_run_seconds", "Local jobs: started to ended.", ["model"], buckets=LATENCY_BUCKETS)
DEVICE_SECONDS = Counter("dla_device_seconds", "Device time jobs used (their share of each step).", ["model"])
UPSTREAM_ERRORS = Counter("dla_upstream_errors", "Failed upstream calls, by provider and code.", ["provider", "code"])


@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not scraper_allowed(request):
        return error_response(
            403, "metrics_forbidden", "This client may not read the metrics ([metrics] in the config)."
        )
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(DeviceQueues())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def scraper_allowed(request: HttpRequest) -> bool:
    """The `[metrics]` token, or an allowed address; loopback only when neither is set."""
    config = settings.LLM_CONFIG.metrics
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if config.token and hmac.compare_digest(header.encode(), f"Bearer {config.token}".encode()):
        return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    if config.allow:
        return any(address in ipaddress.ip_network(entry, strict=False) for entry in config.allow)
    return not config.token and address.is_loopback


class DeviceQueues:
    """Per device and deployment, from what its worker last published: jobs waiting
    for a slot (held or still in the queue), running, whether a worker serves it."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from llmjobs import events
        from llmjobs.routing import device_queue_name

        waiting = GaugeMetricFamily("dla_num_requests_waiting", "Jobs waiting for the device.", labels=["device"])
        running = GaugeMetricFamily("dla_num_requests_running", "Jobs running on the device.", labels=["device"])
        alive = GaugeMetricFamily("dla_worker_up", "1 while a worker serves the device.", labels=["device"])
        try:
            for device in settings.LLM_CONFIG.devices:
                queue = events.queue_state(device_queue_name(device))
                deployments = events.deployment_states(device_queue_name(device))
                busy = sum(d.get("running", 0) for d in deployments.values())
                waiting.add_metric([device], queue.depth)
                running.add_metric([device], busy)
                alive.add_metric([device], 1 if queue.alive else 0)
        except Exception as exc:  # Redis down: the process metrics still answer
            log.warning("metrics: device queues unavailable: %s", type(exc).__name__)
        yield from (waiting, running, alive)


def clear_metrics_dir(path: Path) -> None:
    """At start, before any process of the instance writes: counters restart from zero
    and files of processes that are gone do not count forever."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
