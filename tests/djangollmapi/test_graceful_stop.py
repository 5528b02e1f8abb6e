"""SIGTERM to the web server while clients wait on jobs longer than its grace: each
gets a JSON answer inside the grace (503 `server_stopping`, or that SSE error event),
its job ends failed and refunded, none is left running (djangollmapi.draining)."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import requests

from apikeys.models import ApiKey
from llmjobs.models import Job
from tests.conftest import free_port, start_web, wait_for_http
from tests.helpers import key_row, wait_until

pytestmark = pytest.mark.faults

GRACE_S = 10  # gunicorn's graceful_timeout (djangollmapi.processes)
ENDLESS = {"model": "slow-stream", "max_tokens": 5000, "messages": [{"role": "user", "content": "go on"}]}


def test_waits_longer_than_the_grace_are_answered_json_and_refunded(live, make_key):
    plaintext = make_key()
    api_key = key_row(plaintext)
    port = free_port()
    web = start_web(port)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/healthz", web)
    headers = {"Authorization": f"Bearer {plaintext}"}
    answers: dict[str, tuple[int, str, float]] = {}

    def plain() -> None:
        response = requests.post(f"{url}/v1/chat/completions", json=ENDLESS, headers=headers, timeout=60)
        answers["plain"] = (response.status_code, response.text, time.monotonic())

    def stream() -> None:
        with requests.post(
            f"{url}/v1/chat/completions", json={**ENDLESS, "stream": True}, headers=headers, stream=True, timeout=60
        ) as response:
            lines = [line for line in response.iter_lines() if line]
        answers["stream"] = (response.status_code, b"\n".join(lines).decode(), time.monotonic())

    callers = [threading.Thread(target=plain), threading.Thread(target=stream)]
    for caller in callers:
        caller.start()
    wait_until(
        lambda: (
            Job.objects.filter(api_key=api_key).count() == 2
            and Job.objects.filter(api_key=api_key, status=Job.Status.RUNNING).exists()
        ),
        30,
        "both jobs to be submitted and one to run (the other may wait for the device)",
    )
    stopped_at = time.monotonic()
    web.send_signal(signal.SIGTERM)
    for caller in callers:
        caller.join(GRACE_S + 20)
    web.wait(GRACE_S + 10)

    status, body, at = answers["plain"]
    assert status == 503, body
    assert json.loads(body)["error"]["code"] == "server_stopping"
    assert at - stopped_at < GRACE_S, f"answered {at - stopped_at:.1f} s after SIGTERM"
    status, body, at = answers["stream"]
    assert status == 200
    last_event = json.loads(body.splitlines()[-1].removeprefix("data: "))
    assert last_event["error"]["code"] == "server_stopping", body[-500:]
    assert at - stopped_at < GRACE_S, f"answered {at - stopped_at:.1f} s after SIGTERM"

    jobs = Job.objects.filter(api_key=api_key)
    assert {(job.status, job.error_code, job.refunded) for job in jobs} == {("failed", "server_stopping", True)}
    assert ApiKey.objects.get(id=api_key.id).calls_used == 0
    wait_until(lambda: live.get("/healthz").status_code == 200, 10, "the shared server to be unaffected")
