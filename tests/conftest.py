"""Fixtures: real Redis, a real database, real worker processes, real HTTP.

The `live` fixture starts gunicorn and one worker per device of the test config as
subprocesses pointed at the test database; tests talk to them with `requests`.
"""

from __future__ import annotations

import json as jsonlib
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import requests
from django.conf import settings
from django.db import connection
from django.test import Client

from apikeys.models import ApiKey
from djangollmapi import processes
from djangollmapi.metrics import clear_metrics_dir
from llmjobs import events, journal
from tests import leaks
from tests.helpers import wait_until

LIVE_DEVICES = ("cpu", "cpu:1", "cpu:3")
READY_TIMEOUT_S = 120


def data_dir() -> Path:
    return settings.LLM_CONFIG.server.data_dir


def logs_dir() -> Path:
    path = data_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


# Secrets never logged (tests/leaks.py): what the in-process loggers wrote, where each
# log file stood when the session started, and what the final scan found.
KEPT_LOGS = leaks.KeptLogRecords()
LOG_OFFSETS: dict[Path, int] = {}
LEAKS: list[leaks.Leak | str] = []
SCANNED: list[str] = []  # what the final scan covered


def pytest_sessionstart(session: pytest.Session) -> None:
    """From here on, remember every key made and every secret of the test config, keep
    every in-process log record, and note how far the log files already went."""
    leaks.remember_issued_keys()
    leaks.remember_test_secrets(
        settings,
        {
            "the gateway's upstream secret": PROVIDER_SECRET,
            "the gateway's wrong upstream secret": WRONG_PROVIDER_SECRET,
        },
    )
    logging.getLogger().addHandler(KEPT_LOGS)
    LOG_OFFSETS.update(leaks.log_offsets(logs_dir()))


def pytest_runtest_logstart(nodeid: str, location) -> None:
    KEPT_LOGS.current_test = nodeid


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if a secret reached a log line (after every fixture, the
    servers included, has stopped and flushed its log)."""
    scan = leaks.scan_session(LOG_OFFSETS, logs_dir(), KEPT_LOGS)
    SCANNED.append(scan.summary())
    if KEPT_LOGS not in logging.getLogger().handlers:
        LEAKS.append("the in-process log capture was removed from the root logger; the scan cannot vouch for it")
    LEAKS.extend(scan.leaks)
    if LEAKS:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if not SCANNED:
        return
    if not LEAKS:
        terminalreporter.write_line(f"secrets never logged (tests/leaks.py): none found; {SCANNED[-1]}")
        return
    terminalreporter.section("secrets in logs (tests/leaks.py)", red=True)
    for leak in LEAKS[:50]:
        terminalreporter.write_line(str(leak))
    if len(LEAKS) > 50:
        terminalreporter.write_line(f"... and {len(LEAKS) - 50} more")
    terminalreporter.write_line(f"{SCANNED[-1]}. The session fails: no secret may be logged.", red=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def redis_server() -> Iterator[redis.Redis]:
    """The embedded Redis when no REDIS_URL was given, else the given one; emptied so
    no heartbeat or queue from an earlier run leaks into this one."""
    process = None
    if os.environ.get("DLA_TEST_EMBEDDED_REDIS"):
        process = processes.start_embedded_redis(settings.LLM_CONFIG.redis_socket, logs_dir() / "redis.log")
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    client.flushdb()
    yield client
    if process:
        processes.stop(process)


@pytest.fixture(scope="session", autouse=True)
def journal_closed_before_the_database_goes(django_db_setup, django_db_blocker) -> Iterator[None]:
    """This process's journal (started by the in-process tests' upstream calls) writes
    and closes while the test database still exists: its close asks it whether calls
    still run, and without it would keep its file for a next process."""
    yield
    with django_db_blocker.unblock():
        journal.close()


@pytest.fixture(scope="session")
def tiny_gpt2_path() -> Path:
    from algorithms.tiny_gpt2 import build_tiny_gpt2

    return build_tiny_gpt2(settings.LLM_CONFIG.models_dir / "tiny-gpt2")


def database_url_for_subprocesses() -> str:
    """The test database (created by pytest-django) spelled as a URL for the children."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def child_env(**overrides: str) -> dict[str, str]:
    return {"DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url_for_subprocesses(), **overrides}


def start_worker(device: str, **env: str) -> subprocess.Popen:
    """`runworker <device>` in its own process group; `env` on top of the children's
    (`DLA_NODE="host-a"`: a worker of another host, by its name)."""
    node = f"-{env['DLA_NODE']}" if env.get("DLA_NODE") else ""
    log = logs_dir() / f"worker-{device.replace(':', '-')}{node}.log"
    argv = processes.manage_argv("runworker", device, "--loglevel", "WARNING")
    return processes.spawn(argv, child_env(**env), log)


def start_web(port: int, **env: str) -> subprocess.Popen:
    shape = {"host": "127.0.0.1", "port": port, "web_workers": 2, "web_threads": 32}
    argv = processes.gunicorn_argv(settings.LLM_CONFIG.server.model_copy(update=shape))
    return processes.spawn(argv, child_env(**env), logs_dir() / f"web-{port}.log")


def wait_for_heartbeat(client: redis.Redis, device: str, process: subprocess.Popen) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"worker for {device} exited; see {logs_dir()}")
        return events.worker_alive(device)

    wait_until(ready, READY_TIMEOUT_S, f"the worker for {device} to be ready")


def wait_for_http(url: str, process: subprocess.Popen) -> None:
    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"web server exited; see {logs_dir()}")
        try:
            requests.get(url, timeout=2)
        except (requests.ConnectionError, requests.Timeout):
            return False
        return True

    wait_until(answers, READY_TIMEOUT_S, f"{url} to answer")


@dataclass
class Live:
    url: str
    redis: redis.Redis
    workers: dict[str, subprocess.Popen]

    def post(self, path: str, key: str | None = None, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return requests.post(self.url + path, headers=headers, timeout=60, **kwargs)

    def get(self, path: str, key: str | None = None, **kwargs) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return requests.get(self.url + path, headers=headers, timeout=60, **kwargs)


@pytest.fixture(scope="session")
def live(django_db_setup, django_db_blocker, redis_server, tiny_gpt2_path) -> Iterator[Live]:
    """The real server: gunicorn (gthread) and one Celery worker per device."""
    constructions = data_dir() / "constructions.log"
    constructions.unlink(missing_ok=True)
    clear_metrics_dir(settings.METRICS_DIR)  # as serve does: this run's processes only
    with django_db_blocker.unblock():
        workers = {device: start_worker(device) for device in LIVE_DEVICES}
        port = free_port()
        web = start_web(port)
    try:
        for device, process in workers.items():
            wait_for_heartbeat(redis_server, device, process)
        wait_for_http(f"http://127.0.0.1:{port}/api/usage/", web)
        yield Live(f"http://127.0.0.1:{port}", redis_server, workers)
    finally:
        for process in [web, *workers.values()]:
            processes.stop(process)


@dataclass
class InProcess:
    """The API in this process: Django's test client through every middleware and
    view, with the real database and Redis. For what is decided before a job reaches a
    worker (authentication, bodies, routing, admission), with the same calls as `Live`."""

    client: Client

    def post(self, path: str, key: str | None = None, *, json=None, data=None, headers=None):
        extra = self.meta(key, headers)
        content_type = extra.pop("HTTP_CONTENT_TYPE", "application/json")
        body = jsonlib.dumps(json) if json is not None else (data if data is not None else b"")
        body = body.encode() if isinstance(body, str) else body
        # generic(): sends the bytes as they are, whatever charset the content type names.
        return self.client.generic("POST", path, data=body, content_type=content_type, **extra)

    def get(self, path: str, key: str | None = None, *, headers=None):
        return self.client.get(path, **self.meta(key, headers))

    @staticmethod
    def meta(key: str | None, headers: dict | None) -> dict[str, str]:
        extra = {"HTTP_" + name.upper().replace("-", "_"): value for name, value in (headers or {}).items()}
        if key is not None:
            extra["HTTP_AUTHORIZATION"] = f"Bearer {key}"
        return extra


@pytest.fixture
def api(transactional_db, redis_server) -> InProcess:
    return InProcess(Client())


@pytest.fixture(scope="session")
def smollm2_worker(live) -> Iterator[str]:
    """The demo model, converted once into the test data dir, on its own device."""
    from algorithms.prepare import prepare_model

    prepare_model("smollm2-135m-instruct", settings.LLM_CONFIG.models_dir)
    device = settings.LLM_CONFIG.deployment("smollm2").device
    process = start_worker(device)
    try:
        wait_for_heartbeat(live.redis, device, process)
        yield "smollm2"
    finally:
        processes.stop(process)


@pytest.fixture
def make_key(transactional_db):
    """Issue a real key in the test database; returns the plaintext."""

    def make(**fields) -> str:
        fields.setdefault("name", "test")
        return ApiKey.objects.issue(**fields)[1]

    return make


@pytest.fixture
def key(make_key) -> str:
    return make_key()


@pytest.fixture
def sdk(live, make_key):
    """The official OpenAI client pointed at the live server: `sdk(key)`, or `sdk()`
    with a fresh unlimited key. No retries, so each error surfaces once."""
    import openai

    def make(api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{live.url}/v1", api_key=api_key or make_key(), max_retries=0, timeout=60)

    return make


PROVIDER_SECRET = "dla_provider0key_" + "p" * 43  # the gateway's secret for the "provider"
PROVIDER_SECRET_ENV = "DLA_TEST_PROVIDER_KEY"
WRONG_PROVIDER_SECRET = "dla_nosuchkey000_" + "w" * 43  # the provider knows no such key


@dataclass
class Gateway(Live):
    """A second server of ours whose config adds [[upstreams]] pointing at `live`
    (the provider) and at addresses that fail on purpose."""

    log: Path = Path()
    mortal_port: int = 0
    provider_url: str = ""
    bad_port: int = 0
    relay_port: int = 0
    scripted_port: int = 0


# The misbehaviours of the provider on `bad_port` (tests/gateway/test_upstream_faults.py),
# each a model `bad-<name>` whose provider name is the behaviour.
BAD_BEHAVIOURS = ("hang", "stall", "trickle", "reset", "garbage", "shape", "error", "huge", "endless", "mute", "cookie")


def gateway_config(provider_url: str, down_port: int, mortal_port: int, bad_port: int) -> str:
    """The test config plus the upstreams; relative paths made absolute, as the file
    lives in the data dir."""
    tests_dir = Path(__file__).resolve().parent
    base = (tests_dir / "djangollmapi.test.toml").read_text().replace('jwks_file = "', f'jwks_file = "{tests_dir}/')
    provider = f'base_url = "{provider_url}/v1"\napi_key_env = "{PROVIDER_SECRET_ENV}"\n'
    return base + (
        '\n[[upstreams]]\nname = "provider"\n' + provider + "timeout_s = 10\nconnect_timeout_s = 2\n"
        'models = { "up-words" = "words", "up-tiny" = "tiny-gpt2", "up-slow" = "slow-stream", '
        '"up-minilm" = "minilm", "up-boom" = "boom", "up-echo" = "echo", "up-priced" = "words" }\n'
        'prices = { "up-words" = { input = 1.0, output = 2.0 }, "up-priced" = { input = 0.0, output = 1000.0 } }\n'
        '\n[[upstreams]]\nname = "provider-cached"\n' + provider + "cache_ttl_s = 60\ncache_shared = true\n"
        'cache_hits_count = false\nmodels = { "up-cached" = "words" }\n'
        '\n[[upstreams]]\nname = "provider-slow"\n' + provider + "timeout_s = 1\n"
        'models = { "up-sleepy" = "slow-stream" }\n'
        '\n[[upstreams]]\nname = "provider-badkey"\n'
        f'base_url = "{provider_url}/v1"\napi_key_env = "DLA_TEST_WRONG_KEY"\n'
        'models = { "up-badkey" = "words" }\n'
        '\n[[upstreams]]\nname = "provider-down"\n'
        f'base_url = "http://127.0.0.1:{down_port}/v1"\nconnect_timeout_s = 1\n'
        'models = { "up-down" = "words" }\n'
        '\n[[upstreams]]\nname = "provider-unset"\n'
        f'base_url = "{provider_url}/v1"\napi_key_env = "DLA_TEST_UNSET_KEY"\n'
        'models = { "up-unset" = "words" }\n'
        '\n[[upstreams]]\nname = "provider-mortal"\n'
        f'base_url = "http://127.0.0.1:{mortal_port}/v1"\napi_key_env = "{PROVIDER_SECRET_ENV}"\n'
        'models = { "up-mortal" = "slow-stream" }\n'
        '\n[[upstreams]]\nname = "provider-bad"\n'
        f'base_url = "http://127.0.0.1:{bad_port}/v1"\n'
        "timeout_s = 1\nconnect_timeout_s = 1\ntotal_timeout_s = 2\n"
        "max_response_bytes = 1_000_000\nmax_event_bytes = 65_536\n"
        "models = { " + ", ".join(f'"bad-{name}" = "{name}"' for name in BAD_BEHAVIOURS) + " }\n"
    )


def fallback_config(provider_url: str, relay_port: int, scripted_port: int, down_ports: tuple[int, ...]) -> str:
    """Routes whose backends fail on purpose (tests/gateway/test_fallbacks.py): a
    provider behind a relay that counts connections (`relay_port`), one the test
    scripts (`scripted_port`), three that are down, and a deployment no worker serves."""
    secret = f'api_key_env = "{PROVIDER_SECRET_ENV}"'
    down_a, down_b, gone = (f'base_url = "http://127.0.0.1:{port}/v1"\nconnect_timeout_s = 1' for port in down_ports)
    sections = [
        f'[[upstreams]]\nname = "fb-live"\nbase_url = "{provider_url}/v1"\n{secret}\n'
        'models = { "fb-live-words" = "words" }',
        f'[[upstreams]]\nname = "fb-relay"\nbase_url = "http://127.0.0.1:{relay_port}/v1"\n{secret}\n'
        "connect_timeout_s = 1\ntimeout_s = 5\nallowed_fails = 2\ncooldown_s = 3\n"
        'models = { "fb-relay-words" = "words" }',
        # its tests are about Retry-After and streams, not the breaker: it never opens
        f'[[upstreams]]\nname = "fb-scripted"\nbase_url = "http://127.0.0.1:{scripted_port}/v1"\n{secret}\n'
        'connect_timeout_s = 1\ntimeout_s = 2\nallowed_fails = 1000\nmodels = { "fb-scripted-words" = "words" }',
        f'[[upstreams]]\nname = "fb-down-a"\n{down_a}\nmodels = {{ "fb-down-a-words" = "words" }}',
        f'[[upstreams]]\nname = "fb-down-b"\n{down_b}\nmodels = {{ "fb-down-b-words" = "words" }}',
        f'[[upstreams]]\nname = "fb-gone"\n{gone}\nallowed_fails = 1\nmodels = {{ "fb-gone-words" = "words" }}',
        '[[deployments]]\nname = "fb-orphan"\nalgorithm = "algorithms.echo:Echo"\ndevice = "cuda:7"',
        '[[routes]]\nname = "fb-pair"\ntargets = ["fb-relay-words", "fb-live-words"]',
        '[[routes]]\nname = "fb-scripted-pair"\ntargets = ["fb-scripted-words", "fb-live-words"]',
        '[[routes]]\nname = "fb-local-last"\ntargets = ["fb-down-a-words", "fb-down-b-words", "words"]',
        '[[routes]]\nname = "fb-orphan"\ntargets = ["fb-orphan", "fb-live-words"]',
        '[[routes]]\nname = "fb-missing"\ntargets = ["missing-model", "fb-live-words"]',
        '[[routes]]\nname = "fb-gone-only"\ntargets = ["fb-gone-words"]',
    ]
    return "".join(f"\n{section}\n" for section in sections)


@pytest.fixture(scope="session")
def gateway(live, django_db_blocker) -> Iterator[Gateway]:
    """Our server in front of `live` as its upstream provider, sharing its database,
    Redis and workers (the local models stay reachable through it too)."""
    config = data_dir() / "gateway.toml"
    mortal_port, bad_port, relay_port, scripted_port = free_port(), free_port(), free_port(), free_port()
    config.write_text(
        gateway_config(live.url, down_port=free_port(), mortal_port=mortal_port, bad_port=bad_port)
        + fallback_config(live.url, relay_port, scripted_port, down_ports=(free_port(), free_port(), free_port()))
    )
    port = free_port()
    env = {
        "DJANGO_LLM_API_CONFIG": str(config),
        PROVIDER_SECRET_ENV: PROVIDER_SECRET,
        "DLA_TEST_WRONG_KEY": WRONG_PROVIDER_SECRET,
    }
    with django_db_blocker.unblock():
        web = start_web(port, **env)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/usage/", web)
        url, log = f"http://127.0.0.1:{port}", logs_dir() / f"web-{port}.log"
        yield Gateway(
            url,
            live.redis,
            live.workers,
            log=log,
            mortal_port=mortal_port,
            provider_url=live.url,
            bad_port=bad_port,
            relay_port=relay_port,
            scripted_port=scripted_port,
        )
    finally:
        processes.stop(web)


@pytest.fixture
def provider_key(transactional_db):
    """The provider's key row for the gateway's secret, made per test (the database
    is emptied between tests); `provider_key(max_calls=0)` to restrict it."""
    from apikeys.keys import hash_secret

    def make(**fields) -> ApiKey:
        prefix, secret = PROVIDER_SECRET.split("_")[1], PROVIDER_SECRET.split("_", 2)[2]
        ApiKey.objects.filter(prefix=prefix).delete()
        return ApiKey.objects.create(name="provider", prefix=prefix, secret_hash=hash_secret(secret), **fields)

    make()
    return make
