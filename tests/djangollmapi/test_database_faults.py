"""PostgreSQL stopped under a live server, then started again.

A private cluster made by this test (`initdb` / `pg_ctl` on a free port and a temp dir,
never the machine's own PostgreSQL), migrated, with a web server and a device worker
of its own pointed at it through DATABASE_URL. While the database is down every path
that needs it (authentication, admission, /readyz, a stream's ending) answers JSON 503
`database_unavailable` within a few seconds, never a 500 or a hang; once it is back,
calls succeed by themselves: no stale pooled connection is handed to a request.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests

from djangollmapi import processes
from tests.conftest import child_env, free_port, logs_dir, start_web, wait_for_heartbeat, wait_for_http
from tests.helpers import error_of, wait_until
from tests.pgcluster import COMMAND_TIMEOUT_S, Cluster, private_cluster

pytestmark = pytest.mark.faults

DEVICE = "cpu:5"  # a device of this test's own config only: no other worker serves its queue
DOWN_ANSWER_S = 8  # generous bound on a call while the database is down (the pool waits 2 s)
JOB_TIMEOUT_S = 6

CONFIG = f"""
[server]
job_timeout_s = {JOB_TIMEOUT_S}

[worker]
heartbeat_s = 0.5

[[deployments]]
name = "echo"
algorithm = "algorithms.echo:Echo"
device = "{DEVICE}"

# words at a pace: a stream that is still running when the database stops
[[deployments]]
name = "paced"
algorithm = "algorithms.echo:Echo"
device = "{DEVICE}"
options = {{ token_delay_ms = 100, repeat = true, max_new_tokens = 1000 }}
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with private_cluster(free_port()) as made:
        yield made


@dataclass
class Server:
    url: str
    key: str


@pytest.fixture(scope="module")
def server(cluster, redis_server) -> Iterator[Server]:
    """Our web server and device worker on the cluster, with their own config and
    metrics folder; the database migrated and one key issued by the operator's commands."""
    config = cluster.root / "djangollmapi.toml"
    config.write_text(CONFIG)
    metrics_dir = cluster.root / "metrics"
    metrics_dir.mkdir()
    env = child_env(
        DATABASE_URL=cluster.url, DJANGO_LLM_API_CONFIG=str(config), PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)
    )
    manage = lambda *args: subprocess.run(  # noqa: E731
        processes.manage_argv(*args),
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    manage("migrate", "--noinput")
    key = manage("createapikey", "--name", "database-faults", "--quiet").stdout.strip()
    argv = processes.manage_argv("runworker", DEVICE, "--loglevel", "WARNING")
    worker = processes.spawn(argv, env, logs_dir() / "worker-database-faults.log")
    port = free_port()
    web = start_web(port, **env)
    try:
        wait_for_heartbeat(redis_server, DEVICE, worker)
        wait_for_http(f"http://127.0.0.1:{port}/healthz", web)
        yield Server(f"http://127.0.0.1:{port}", key)
    finally:
        processes.stop(web)
        processes.stop(worker)


def api(server: Server, path: str, body: dict | None = None, *, key: str | None = None, **kwargs):
    headers = {"Authorization": f"Bearer {key or server.key}"}
    if body is None:
        return requests.get(server.url + path, headers=headers, timeout=30, **kwargs)
    return requests.post(server.url + path, json=body, headers=headers, timeout=30, **kwargs)


HELLO = {"role": "user", "content": "hi"}


def timed(call, *args, **kwargs) -> tuple[requests.Response, float]:
    started = time.monotonic()
    reply = call(*args, **kwargs)
    return reply, time.monotonic() - started


CALLS = {
    "the seed's /api/": lambda s: api(s, "/api/", {"text": "hello", "model": "echo"}),
    "a chat": lambda s: api(s, "/v1/chat/completions", {"model": "echo", "messages": [HELLO]}),
    "a stream": lambda s: api(s, "/v1/completions", {"model": "echo", "prompt": "hi", "stream": True}),
    "the model list": lambda s: api(s, "/v1/models"),
    "the key's usage": lambda s: api(s, "/api/usage/"),
    "an unknown key": lambda s: api(s, "/v1/models", key="dla_nosuchkey000_" + "n" * 43),
}


def test_calls_are_503_while_the_database_is_down_and_succeed_once_it_is_back(cluster, server):
    for name, make in CALLS.items():
        if name != "an unknown key":
            reply = make(server)
            assert reply.status_code == 200, (name, reply.text)
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200

    cluster.stop()
    try:
        for name, make in CALLS.items():
            reply, elapsed = timed(make, server)
            assert reply.status_code == 503, (name, reply.status_code, reply.text)
            assert error_of(reply)["code"] == "database_unavailable", name
            assert elapsed < DOWN_ANSWER_S, (name, elapsed)
        ready, elapsed = timed(requests.get, server.url + "/readyz", timeout=30)
        assert (ready.status_code, ready.json()["checks"]["database"]) == (503, False)
        assert elapsed < DOWN_ANSWER_S
    finally:
        cluster.start()

    # Back: the very next calls succeed, on every web process and thread (no stale
    # connection from before the stop is handed out), and the worker records jobs again.
    for _ in range(3):
        for name, make in CALLS.items():
            reply = make(server)
            expected = 401 if name == "an unknown key" else 200
            assert reply.status_code == expected, (name, reply.status_code, reply.text)
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200


def test_a_restart_between_calls_is_not_seen_by_the_calls_after_it(cluster, server):
    """No call comes while it is down, so every pooled connection of both web
    processes and the worker is dead when the next calls come: each is checked and
    replaced before a request or a job gets it."""
    several = lambda: list(ThreadPoolExecutor(8).map(lambda _: CALLS["a chat"](server).status_code, range(16)))  # noqa: E731
    assert several() == [200] * 16  # connections pooled in both web processes
    cluster.stop()
    cluster.start()
    assert several() == [200] * 16


def test_a_stream_running_when_the_database_stops_ends_with_an_error_event(cluster, server):
    body = {"model": "paced", "prompt": "tick tock", "max_tokens": 20, "stream": True}
    reply = api(server, "/v1/completions", body, stream=True)
    assert reply.status_code == 200
    lines = reply.iter_lines()
    first = next(line for line in lines if line.startswith(b"data: "))
    assert json.loads(first[len(b"data: ") :])["choices"]
    started = time.monotonic()
    cluster.stop()
    try:
        rest = [line for line in lines if line.startswith(b"data: ")]
        elapsed = time.monotonic() - started
    finally:
        cluster.start()
    # The worker cannot record the answer, so the stream ends with an error event,
    # within the job's deadline, never cut off without one.
    last = json.loads(rest[-1][len(b"data: ") :])
    assert last["error"]["code"] == "database_unavailable", last
    assert elapsed < JOB_TIMEOUT_S + DOWN_ANSWER_S
    wait_until(lambda: api(server, "/api/", {"text": "again", "model": "echo"}).status_code == 200, 20, "a call")
