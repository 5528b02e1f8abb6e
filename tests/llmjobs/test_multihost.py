"""Workers on two hosts, shown: two network namespaces as worker hosts and a third for
the web tier, joined by veth pairs to a bridge where one Redis and one PostgreSQL
listen, all on addresses this test made. Both hosts serve the same model on the same
device name; stopping one shifts new jobs to the other; no job is lost or run twice."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import requests

from djangollmapi import processes
from djangollmapi.config import ServerConfig
from tests.conftest import free_port
from tests.helpers import wait_until
from tests.netns import Network, hosts_network
from tests.pgcluster import COMMAND_TIMEOUT_S, Cluster, private_cluster

pytestmark = pytest.mark.multihost

DEVICE = "cpu:9"  # the same device name on both worker hosts
SUBNET = "10.231.7.0/24"
READY_S = 120
DELAY_MS = 300  # long enough that 20 concurrent jobs keep both hosts busy


def config_toml(web_address: str) -> str:
    return f"""
[server]
allowed_hosts = ["{web_address}"]
job_timeout_s = 60

[worker]
heartbeat_s = 0.5

[[deployments]]
name = "echo"
algorithm = "algorithms.echo:Echo"
device = "{DEVICE}"
options = {{ delay_ms = {DELAY_MS} }}
"""


@dataclass
class Cluster2:
    network: Network
    url: str
    key: str
    database: Cluster
    workers: dict[str, subprocess.Popen]
    logs: Path

    def call(self, text: str) -> requests.Response:
        return requests.post(
            f"{self.url}/api/",
            json={"text": text, "model": "echo"},
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=60,
        )

    def jobs(self) -> list[tuple[str, str, str, str]]:
        """(input, status, worker, output) of every job, read from the database."""
        with psycopg.connect(self.database.url.replace("postgres://", "postgresql://")) as connection:
            rows = connection.execute("SELECT input_text, status, worker, output::text FROM llmjobs_job").fetchall()
        return [tuple(str(value) for value in row) for row in rows]


def start_redis(address: str, port: int, folder: Path) -> subprocess.Popen:
    argv = [
        processes.redis_server_binary(),
        *("--bind", address, "--port", str(port), "--protected-mode", "no"),
        *("--save", "", "--appendonly", "no", "--dir", str(folder)),
    ]
    process = processes.spawn(argv, log_path=folder / "redis.log")
    processes.wait_for_redis(f"redis://{address}:{port}/0", process)
    return process


@pytest.fixture(scope="module")
def two_hosts() -> Iterator[Cluster2]:
    with contextlib.ExitStack() as stack:
        network = stack.enter_context(hosts_network("dlamh", SUBNET, ["web", "h1", "h2"]))
        folder = Path(tempfile.mkdtemp(prefix="dla-multihost-"))
        database = stack.enter_context(private_cluster(free_port(), host=network.hub))
        redis_port = free_port()
        stack.callback(processes.stop, start_redis(network.hub, redis_port, folder))
        redis_url = f"redis://{network.hub}:{redis_port}/0"
        web_address = network.hosts["web"]
        (folder / "djangollmapi.toml").write_text(config_toml(web_address))
        (folder / "metrics").mkdir()
        env = {
            "DJANGO_SETTINGS_MODULE": "djangollmapi.settings",
            "DJANGO_LLM_API_CONFIG": str(folder / "djangollmapi.toml"),
            "DJANGO_LLM_API_DATA_DIR": str(folder),
            "DATABASE_URL": database.url,
            "REDIS_URL": redis_url,
            "DJANGO_SECRET_KEY": "multihost-test-secret-key-0123456789abcdef0123456789",
            "PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics"),
        }

        def manage(*args: str) -> str:
            done = subprocess.run(
                processes.manage_argv(*args),
                env={**os.environ, **env},
                check=True,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
            )
            return done.stdout

        manage("migrate", "--noinput", "-v", "0")
        key = manage("createapikey", "--name", "multihost", "--quiet").strip().splitlines()[-1]
        workers = {}
        for host in ("h1", "h2"):
            argv = network.argv(host, processes.manage_argv("runworker", DEVICE, "--loglevel", "WARNING"))
            workers[host] = processes.spawn(argv, {**env, "DLA_NODE": host}, folder / f"worker-{host}.log")
            stack.callback(processes.stop, workers[host])
        port = free_port()
        server = ServerConfig(host=web_address, port=port, web_workers=2, web_threads=16)
        web = processes.spawn(network.argv("web", processes.gunicorn_argv(server)), env, folder / "web.log")
        stack.callback(processes.stop, web)
        hosts = Cluster2(network, f"http://{web_address}:{port}", key, database, workers, folder)
        wait_until(lambda: ready(hosts), READY_S, "the web host to be ready")
        yield hosts


def ready(hosts: Cluster2) -> bool:
    """/readyz: the database, Redis and a live worker for the model."""
    try:
        return requests.get(f"{hosts.url}/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def served_by(hosts: Cluster2, texts: list[str]) -> dict[str, str]:
    """Send the calls at once; each must succeed. The worker that ran each, by text."""
    with ThreadPoolExecutor(len(texts)) as pool:
        answers = list(pool.map(hosts.call, texts))
    assert [answer.status_code for answer in answers] == [200] * len(texts), [a.text for a in answers]
    workers = {row[0]: row[2] for row in hosts.jobs()}
    return {text: workers[text] for text in texts}


def host_of(worker: str) -> str:
    return next(host for host in ("h1", "h2") if host in worker)


def both_hosts_take_jobs(hosts: Cluster2, round_: list[int]) -> bool:
    round_[0] += 1
    texts = [f"warm {round_[0]}.{n}" for n in range(8)]
    return {host_of(worker) for worker in served_by(hosts, texts).values()} == {"h1", "h2"}


def test_both_hosts_serve_and_stopping_one_shifts_jobs_to_the_other(two_hosts):
    rounds = [0]
    wait_until(lambda: both_hosts_take_jobs(two_hosts, rounds), READY_S, "both worker hosts to take jobs")
    first = served_by(two_hosts, [f"first {n}" for n in range(20)])
    assert {host_of(worker) for worker in first.values()} == {"h1", "h2"}
    assert_traffic_on_test_addresses(two_hosts)

    stopped = two_hosts.workers["h1"]
    os.killpg(stopped.pid, signal.SIGTERM)  # a warm shutdown of h1's supervisor and worker
    stopped.wait(60)
    after = served_by(two_hosts, [f"after {n}" for n in range(10)])
    assert {host_of(worker) for worker in after.values()} == {"h2"}

    jobs = two_hosts.jobs()
    texts = [row[0] for row in jobs]
    assert len(texts) == len(set(texts)), "a call made two jobs"
    assert {row[1] for row in jobs} == {"succeeded"}, [row for row in jobs if row[1] != "succeeded"]
    assert all(row[0] in row[3] for row in jobs), "a job carries another's answer"


def assert_traffic_on_test_addresses(hosts: Cluster2) -> None:
    """Every connection of every host goes to an address this test made."""
    subnet = ipaddress.ip_network(SUBNET)
    for host in ("web", "h1", "h2"):
        peers = hosts.network.peers(host)
        assert peers, f"{host} has no connections"
        assert all(ipaddress.ip_address(peer) in subnet for peer in peers), (host, peers)
