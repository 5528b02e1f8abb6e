"""`manage.py serve` under faults, started as a user starts it: a child killed (the
embedded Redis, the device's worker, the web server) is restarted and the API works
again with nobody touching serve; a Redis that is down or frozen answers a JSON 503
within the client's 3 s; SIGTERM under load lets the calls in flight end and leaves
no job active."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port
from tests.djangollmapi.test_serve import start_serve as start_serve_process
from tests.helpers import error_of, wait_until

pytestmark = pytest.mark.faults

CLIENT_TIMEOUT_S = 3  # a failure must be answered within this, never a hang
READY_S = 120
RECOVERY_S = 60
SLOW_MS = 1500
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi there"}]}
CALLS = {
    "api": ("/api/", {"text": "hi", "model": "echo"}),
    "chat": ("/v1/chat/completions", CHAT),
    "stream": ("/v1/chat/completions", {**CHAT, "stream": True}),
    "job": ("/api/jobs/", {"text": "hi", "model": "echo"}),
}
OUTAGE_CODES = {"broker_unavailable", "no_worker"}


@dataclass
class Served:
    """A running `serve`: its process, what it printed (read by a thread), its demo key."""

    process: subprocess.Popen
    url: str
    data_dir: Path
    lines: list[str] = field(default_factory=list)
    key: str = ""

    def read_output(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def printed(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def wait_for_output(self, text: str, timeout_s: float) -> None:
        wait_until(lambda: self.printed(text), timeout_s, f"serve printing {text!r}\n" + "\n".join(self.lines))

    def child(self, kind: str) -> int:
        """The pid of serve's child of `kind`: redis, worker (`runworker cpu`) or web."""
        for pid, argv in children(self.process.pid):
            if kind == "redis" and "redis-server" in argv[0]:
                return pid
            if kind == "worker" and "runworker" in argv and "--child" not in argv:
                return pid
            if kind == "web" and "gunicorn" in argv:
                return pid
        raise AssertionError(f"serve has no {kind} child: {children(self.process.pid)}")

    def post(self, path: str, body: dict, timeout_s: float = CLIENT_TIMEOUT_S) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.key}"}
        return requests.post(self.url + path, headers=headers, json=body, timeout=timeout_s)

    def calls_used(self) -> int:
        reply = requests.get(f"{self.url}/api/usage/", headers={"Authorization": f"Bearer {self.key}"}, timeout=10)
        return reply.json()["key"]["calls_used"]

    def jobs(self, sql: str) -> list[tuple]:
        with sqlite3.connect(f"file:{self.data_dir / 'db.sqlite3'}?mode=ro", uri=True, timeout=10) as db:
            return db.execute(sql).fetchall()


def children(pid: int) -> list[tuple[int, list[str]]]:
    """Live children of `pid` with their argv, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state_and_ppid = (entry / "stat").read_text().rpartition(")")[2].split()
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if state_and_ppid[0] != "Z" and int(state_and_ppid[1]) == pid:
            found.append((int(entry.name), argv))
    return found


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def start_serve(tmp_path: Path) -> Served:
    port = free_port()
    data_dir = tmp_path / "data"
    config = tmp_path / "djangollmapi.toml"
    config.write_text(
        f'[server]\ndata_dir = "{data_dir}"\nport = {port}\n'
        # short: a worker's coming and going is seen within a second
        "[worker]\nheartbeat_s = 0.5\n"
        '[[deployments]]\nname = "echo"\nalgorithm = "algorithms.echo:Echo"\n'
        '[[deployments]]\nname = "slow"\nalgorithm = "algorithms.echo:Echo"\n'
        f"options = {{ delay_ms = {SLOW_MS} }}\n"
    )
    process = start_serve_process(config)
    served = Served(process, f"http://127.0.0.1:{port}", data_dir)
    threading.Thread(target=served.read_output, daemon=True).start()
    served.wait_for_output("serving on", READY_S)
    served.key = next(line.split()[-1] for line in served.lines if line.startswith("demo key: "))
    return served


def stop_serve(served: Served) -> None:
    if served.process.poll() is None:
        served.process.terminate()
        try:
            served.process.wait(60)
        except subprocess.TimeoutExpired:
            served.process.kill()
            served.process.wait(10)


@pytest.fixture(scope="module")
def serve(tmp_path_factory) -> Iterator[Served]:
    """One `serve` for the faults that it repairs by itself; each test breaks it and
    leaves it working."""
    served = start_serve(tmp_path_factory.mktemp("serve-faults"))
    yield served
    stop_serve(served)


def answer(served: Served, name: str) -> tuple[requests.Response | None, float, str]:
    """One of CALLS, its time, and what went wrong with the exchange itself, if anything."""
    path, body = CALLS[name]
    started = time.monotonic()
    try:
        return served.post(path, body), time.monotonic() - started, ""
    except requests.RequestException as exc:
        return None, time.monotonic() - started, f"{type(exc).__name__}: {exc}"


def assert_json_503(served: Served, name: str, codes: set[str] = OUTAGE_CODES) -> None:
    assert_answered_503(name, *answer(served, name), codes)


def assert_answered_503(
    name: str, response: requests.Response | None, elapsed: float, failure: str, codes: set[str]
) -> None:
    assert response is not None, f"{name}: no answer within {CLIENT_TIMEOUT_S} s ({elapsed:.2f} s): {failure}"
    assert response.status_code == 503, f"{name}: {response.status_code} after {elapsed:.2f} s: {response.text}"
    assert error_of(response)["code"] in codes, f"{name} after {elapsed:.2f} s: {response.text}"


def succeeds(served: Served, name: str) -> bool:
    """Whether the call is answered as it should be; an async job also runs to its end."""
    response, _elapsed, _failure = answer(served, name)
    if response is None or response.status_code not in (200, 202):
        return False
    if name == "stream":
        return response.text.rstrip().endswith("data: [DONE]")
    if name == "job":
        url = f"{served.url}/api/jobs/{response.json()['job_id']}/"
        headers = {"Authorization": f"Bearer {served.key}"}
        done = lambda: requests.get(url, headers=headers, timeout=10).json()["status"] != "queued"  # noqa: E731
        wait_until(done, RECOVERY_S, "the async job to leave the queue")
        return requests.get(url, headers=headers, timeout=10).json()["status"] == "succeeded"
    return True


def assert_everything_works(served: Served) -> None:
    """Every kind of call succeeds, once serve has repaired what broke."""
    for name in CALLS:
        wait_until(lambda name=name: succeeds(served, name), RECOVERY_S, f"{name} to succeed again")


class InFlight(threading.Thread):
    """A slow call sent now; `result` is its response, or the exchange's failure."""

    def __init__(self, served: Served, path: str = "/api/", body: dict | None = None) -> None:
        super().__init__(daemon=True)
        self.served, self.path, self.body = served, path, body or {"text": "in flight", "model": "slow"}
        self.result: requests.Response | str | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.served.post(self.path, self.body, timeout_s=30)
        except requests.RequestException as exc:
            self.result = f"{type(exc).__name__}: {exc}"

    def outcome(self) -> requests.Response:
        self.join(40)
        assert isinstance(self.result, requests.Response), f"the call in flight got no answer: {self.result}"
        return self.result


def wait_until_running(served: Served, count: int = 1) -> None:
    sql = "SELECT count(*) FROM llmjobs_job WHERE model = 'slow' AND status = 'running'"
    wait_until(lambda: served.jobs(sql)[0][0] >= count, 30, f"{count} slow job(s) running")


def test_a_killed_redis_is_503_at_once_then_restarted_and_served_again(serve):
    assert_everything_works(serve)
    used = serve.calls_used()
    in_flight = InFlight(serve)
    wait_until_running(serve)
    redis_pid = serve.child("redis")
    os.kill(redis_pid, signal.SIGKILL)
    wait_until(lambda: gone(redis_pid), 10, "redis to die")
    for name in CALLS:
        assert_json_503(serve, name)
    response = in_flight.outcome()
    assert response.status_code == 503 and error_of(response)["code"] == "broker_unavailable", response.text
    serve.wait_for_output("redis exited with status -9; restarting in 0.5 s", 10)
    serve.wait_for_output("redis restarted", 10)
    assert serve.child("redis") != redis_pid
    assert_everything_works(serve)
    # Only the calls that succeeded (one of each) are charged: each failed one was refunded.
    assert serve.calls_used() == used + len(CALLS)


def test_a_frozen_redis_is_503_within_the_client_timeout_then_served_again(serve):
    assert_everything_works(serve)
    used = serve.calls_used()
    redis_pid = serve.child("redis")
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        for name in CALLS:
            assert_json_503(serve, name, {"broker_unavailable"})
    finally:
        os.kill(redis_pid, signal.SIGCONT)
    assert_everything_works(serve)
    assert serve.child("redis") == redis_pid  # it was only frozen: nothing restarted
    assert serve.calls_used() == used + len(CALLS)


def test_a_killed_worker_finishes_its_job_and_is_restarted(serve):
    assert_everything_works(serve)
    in_flight = InFlight(serve)
    wait_until_running(serve)
    worker_pid = serve.child("worker")
    os.kill(worker_pid, signal.SIGKILL)
    # Its worker process, told by the kernel its parent died, shuts down warm: the job
    # it runs ends, and it takes no new one.
    response = in_flight.outcome()
    assert response.status_code == 200, response.text
    assert response.json()["message"] == "in flight"
    serve.wait_for_output("worker cpu exited with status -9; restarting in 0.5 s", 10)
    ready = lambda: requests.get(f"{serve.url}/readyz", timeout=CLIENT_TIMEOUT_S).status_code  # noqa: E731
    wait_until(lambda: ready() == 503 or serve.printed("worker cpu restarted"), 20, "the worker to be missed")
    for name in CALLS:  # answered at once: refused while no worker serves, or served by the new one
        response, elapsed, failure = answer(serve, name)
        if response is None or response.status_code not in (200, 202):
            assert_answered_503(name, response, elapsed, failure, {"no_worker"})
    serve.wait_for_output("worker cpu restarted", RECOVERY_S)
    assert_everything_works(serve)
    assert serve.child("worker") != worker_pid


def test_a_killed_web_server_finishes_its_requests_and_is_restarted(serve):
    assert_everything_works(serve)
    in_flight = InFlight(serve)
    wait_until_running(serve)
    web_pid = serve.child("web")
    os.kill(web_pid, signal.SIGKILL)
    # gunicorn's workers outlive their arbiter long enough to answer what they hold.
    response = in_flight.outcome()
    assert response.status_code == 200, response.text
    serve.wait_for_output("web exited with status -9; restarting in 0.5 s", 10)
    serve.wait_for_output("web restarted", RECOVERY_S)
    assert_everything_works(serve)
    assert serve.child("web") != web_pid


def test_sigterm_under_load_lets_calls_in_flight_end_and_leaves_no_job_active(tmp_path):
    served = start_serve(tmp_path)
    try:
        stream = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "in flight"}]}
        calls = [
            InFlight(served),
            InFlight(served, "/v1/chat/completions", {**stream, "stream": False}),
            InFlight(served, "/v1/chat/completions", stream),
            InFlight(served),
        ]
        # All four are in: one runs, three wait for the device (one job at a time),
        # 6 s of work within the web server's 10 s graceful timeout.
        count = "SELECT count(*) FROM llmjobs_job WHERE model = 'slow'"
        wait_until(lambda: served.jobs(count)[0][0] == len(calls), 30, "every call to be in")
        # Then 30 s of async jobs behind them: more than the worker's warm shutdown may take.
        for _ in range(20):
            assert served.post("/api/jobs/", {"text": "later", "model": "slow"}).status_code == 202
        served.process.send_signal(signal.SIGTERM)
        for call in calls:
            response = call.outcome()
            assert response.status_code == 200 or error_of(response), response.text
        assert served.process.wait(timeout=90) == 0
        output = "\n".join(served.lines)
        assert output.index("stopped web") < output.index("stopped worker cpu") < output.index("stopped redis"), output
        assert "unfinished job(s) failed and refunded" in output, output
    finally:
        stop_serve(served)
    statuses = [call.outcome().status_code for call in calls]
    assert 200 in statuses, statuses  # the work fits in the web server's graceful timeout
    left = served.jobs("SELECT id, status FROM llmjobs_job WHERE status IN ('queued', 'running')")
    assert left == [], f"jobs left active after the stop: {left}"
    stopped = served.jobs("SELECT refunded, count(*) FROM llmjobs_job WHERE error_code = 'server_stopped' GROUP BY 1")
    assert [refunded for refunded, _count in stopped] == [1], stopped
