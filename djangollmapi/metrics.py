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


class NoMetric:
    """What every metric is with `[metrics] enabled = false`: nothing counted, nothing
    written, at no cost on the hot path."""

    def labels(self, *values: str) -> NoMetric:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


def counter(name: str, documentation: str, labels: list[str]) -> Counter | NoMetric:
    return Counter(name, documentation, labels) if ENABLED else NoMetric()


def histogram(name: str, documentation: str, labels: list[str]) -> Histogram | NoMetric:
    return Histogram(name, documentation, labels, buckets=LATENCY_BUCKETS) if ENABLED else NoMetric()


ENABLED = settings.LLM_CONFIG.metrics.enabled
REQUESTS = counter("dla_http_requests", "API requests, by route, status and model.", ["route", "status", "model"])
REQUEST_SECONDS = histogram(
    "dla_http_request_duration_seconds", "API request latency (a stream: to its end).", ["route"]
)
ERRORS = counter("dla_errors", "Error answers by code (rejections, limits, failures).", ["code"])
TIME_TO_FIRST_TOKEN = histogram(
    "dla_time_to_first_token_seconds", "Streamed requests: request to first token.", ["model"]
)
TOKENS = counter("dla_tokens", "Tokens of finished calls, by model and type (prompt, completion).", ["model", "type"])
JOBS = counter("dla_jobs", "Ended jobs (calls), by model, status and error code.", ["model", "status", "code"])
QUEUE_SECONDS = histogram("dla_request_queue_time_seconds", "Local jobs: sent to started on the device.", ["model"])
RUN_SECONDS = histogram("dla_job_run_seconds", "Local jobs: started to ended.", ["model"])
DEVICE_SECONDS = counter("dla_device_seconds", "Device time jobs used (their share of each step).", ["model"])
DEVICE_BUSY_SECONDS = counter(
    "dla_device_busy_seconds", "Time the device ran model steps: its rate is the busy share.", ["device"]
)
UPSTREAM_ERRORS = counter("dla_upstream_errors", "Failed upstream calls, by provider and code.", ["provider", "code"])
FALLBACKS = counter(
    "dla_fallbacks",
    "Route calls handed on after a backend failed, by route, backend and code.",
    ["model", "backend", "code"],
)
BACKEND_SKIPS = counter(
    "dla_backend_skips",
    "Route calls that skipped a backend (open, half_open, retry_after), by route, backend and reason.",
    ["model", "backend", "reason"],
)


@never_cache
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not ENABLED:
        return error_response(404, "not_found", "Metrics are switched off ([metrics] enabled = false).")
    if not scraper_allowed(request):
        return error_response(
            403, "metrics_forbidden", "This client may not read the metrics ([metrics] in the config)."
        )
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(DeviceQueues())
    registry.register(KeyBudgets())
    registry.register(Breakers())
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
    """Per device, from what its workers (on every host) last published: jobs waiting
    for a slot (held or still in the queue), running, whether a worker serves it, and
    how many do."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from llmjobs import events
        from llmjobs.routing import device_queue_name

        waiting = GaugeMetricFamily("dla_num_requests_waiting", "Jobs waiting for the device.", labels=["device"])
        running = GaugeMetricFamily("dla_num_requests_running", "Jobs running on the device.", labels=["device"])
        alive = GaugeMetricFamily("dla_worker_up", "1 while a worker serves the device.", labels=["device"])
        workers = GaugeMetricFamily("dla_workers", "Live workers of the device, on all hosts.", labels=["device"])
        try:
            for device in settings.LLM_CONFIG.devices:
                queue = events.queue_state(device_queue_name(device))
                deployments = events.deployment_states(device_queue_name(device))
                busy = sum(d.get("running", 0) for d in deployments.values())
                waiting.add_metric([device], queue.depth)
                running.add_metric([device], busy)
                alive.add_metric([device], 1 if queue.alive else 0)
                workers.add_metric([device], len(queue.workers))
        except Exception as exc:  # Redis down: the process metrics still answer
            log.warning("metrics: device queues unavailable: %s", type(exc).__name__)
        yield from (waiting, running, alive, workers)


class KeyBudgets:
    """What each limited key has left (LiteLLM's remaining budget per key), read from
    the database when scraped: calls for keys with a quota, tokens for keys with a
    token budget; revoked and expired keys are left out."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from django.db.models import Q
        from django.utils import timezone

        from apikeys.models import ApiKey

        calls = GaugeMetricFamily(
            "dla_api_key_remaining_calls", "Calls a key may still make.", labels=["key", "key_alias"]
        )
        tokens = GaugeMetricFamily(
            "dla_api_key_remaining_tokens", "Tokens left in a key's budget.", labels=["key", "key_alias"]
        )
        limited = ApiKey.objects.filter(revoked_at=None).exclude(valid_until__lte=timezone.now())
        limited = limited.filter(Q(max_calls__isnull=False) | Q(max_tokens_total__isnull=False))
        try:
            for key in limited.only("prefix", "name", "max_calls", "calls_used", "max_tokens_total", "tokens_used"):
                if key.calls_left is not None:
                    calls.add_metric([key.prefix, key.name], key.calls_left)
                if key.tokens_left is not None:
                    tokens.add_metric([key.prefix, key.name], key.tokens_left)
        except Exception as exc:  # the database down: the process metrics still answer
            log.warning("metrics: key budgets unavailable: %s", type(exc).__name__)
        yield from (calls, tokens)


class Breakers:
    """Each upstream provider's circuit breaker (gateway.breaker), read when scraped:
    its state (1 for the one it is in) and its failures in a row."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from gateway import breaker

        state = GaugeMetricFamily(
            "dla_upstream_breaker_state", "1 for the state the provider's breaker is in.", labels=["provider", "state"]
        )
        failures = GaugeMetricFamily(
            "dla_upstream_consecutive_failures", "The provider's failures in a row.", labels=["provider"]
        )
        providers = [u.name for u in settings.LLM_CONFIG.upstreams]
        for provider, entry in breaker.board().report(providers).items():
            for phase in breaker.PHASES:
                state.add_metric([provider, phase], 1 if entry["state"] == phase else 0)
            failures.add_metric([provider], entry["consecutive_failures"])
        yield from (state, failures)


def clear_metrics_dir(path: Path) -> None:
    """At start, before any process of the instance writes: counters restart from zero
    and files of processes that are gone do not count forever."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
