"""A crash between an answer and its record loses nothing (`llmjobs.journal`): a web
process whose writer waits 10 s before each batch answers a call, is killed (SIGKILL,
no exit handler runs) while the record is only in its journal, and the next web
process on the host writes it at its start (with write-behind on or off): the job ends
`succeeded` with the tokens and cost the client was told, charged once to its key and
its day. A web process killed mid-call, or stopped while a call outlives its graceful
stop's grace, leaves its job `running`: the next one fails it `gateway_lost`, refunded,
its reservation released."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import pytest
import requests

from djangollmapi import processes
from llmjobs import upstreamjobs
from llmjobs.models import Job, UsageDay
from tests.conftest import PROVIDER_SECRET, PROVIDER_SECRET_ENV, free_port, gateway_config, start_web, wait_for_http
from tests.helpers import key_row, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "up-words", "messages": [{"role": "user", "content": "one two three"}]}


@pytest.fixture
def env(live, provider_key, tmp_path: Path) -> dict[str, str]:
    """A gateway in front of `live`, with a data dir of its own (so only its own
    processes find its journals) and a writer that waits 10 s before it writes."""
    return gateway_env(live, tmp_path, "write_behind_wait_ms = 10000")


# A provider that may take longer than a graceful stop's grace (10 s) to answer.
PATIENT = '[[upstreams]]\nname = "provider-patient"\nbase_url = "{url}/v1"\napi_key_env = "{secret}"\n'
PATIENT += 'timeout_s = 60\nmodels = {{ "up-patient" = "slow-stream" }}\n'


def gateway_env(live, tmp_path: Path, server_line: str) -> dict[str, str]:
    config = tmp_path / f"gateway-{abs(hash(server_line))}.toml"
    text = gateway_config(live.url, down_port=free_port(), mortal_port=free_port(), bad_port=free_port())
    text += "\n" + PATIENT.format(url=live.url, secret=PROVIDER_SECRET_ENV)
    config.write_text(text.replace("[server]\n", f"[server]\n{server_line}\n", 1))
    return {
        "DJANGO_LLM_API_CONFIG": str(config),
        "DJANGO_LLM_API_DATA_DIR": str(tmp_path / "data"),
        PROVIDER_SECRET_ENV: PROVIDER_SECRET,
    }


def started(env: dict[str, str]):
    port = free_port()
    web = start_web(port, **env)
    wait_for_http(f"http://127.0.0.1:{port}/api/usage/", web)
    return port, web


def answered(port: int, key: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"}
    reply = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply


def journals(tmp_path: Path) -> dict[str, str]:
    return {path.name: path.read_text() for path in (tmp_path / "data" / "journal").glob("*.journal")}


@pytest.mark.parametrize("next_one", ["write_behind = true", "write_behind = false"])
def test_a_web_process_killed_after_answering_leaves_its_record_to_the_next(live, env, make_key, tmp_path, next_one):
    port, web = started(env)
    try:
        key = make_key(max_calls=5)
        reply = answered(port, key)
        assert reply.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
        job_id = reply.headers["X-Request-Id"]
        assert Job.objects.get(id=job_id).status == Job.Status.RUNNING  # answered, not yet written
        left = [name for name, text in journals(tmp_path).items() if job_id in text]
        assert len(left) == 1  # ...but in its process's journal
    finally:
        os.killpg(web.pid, signal.SIGKILL)  # no exit handler writes it now
        web.wait(10)
    assert Job.objects.get(id=job_id).status == Job.Status.RUNNING

    _port, web = started(gateway_env(live, tmp_path, next_one))  # the next web process on this host
    try:
        wait_until(lambda: Job.objects.get(id=job_id).status == Job.Status.SUCCEEDED, 20, "the record to be written")
        assert left[0] not in journals(tmp_path)  # the dead process's journal is gone
    finally:
        processes.stop(web)
    job = Job.objects.get(id=job_id)
    assert (job.prompt_tokens, job.completion_tokens, job.output) == (3, 3, "one two three")
    assert float(job.cost_usd) == pytest.approx((3 * 1.0 + 3 * 2.0) / 1_000_000)
    row = key_row(key)
    assert (row.calls_used, row.tokens_used) == (1, 6)  # its reservation settled to what it used, once
    assert UsageDay.objects.get(api_key=row).succeeded == 1


def test_a_web_process_stopped_gracefully_writes_what_it_answered(env, make_key, tmp_path):
    port, web = started(env)
    try:
        reply = answered(port, make_key(max_calls=5))
    finally:
        processes.stop(web)  # SIGTERM: each worker writes its journal before it exits
    job = Job.objects.get(id=reply.headers["X-Request-Id"])
    assert (job.status, job.prompt_tokens, job.completion_tokens) == (Job.Status.SUCCEEDED, 3, 3)
    assert journals(tmp_path) == {}


def streaming_slowly(port: int, key: str, max_tokens: int):
    """A stream from the slow model (a token every 100 ms), begun: its first event read."""
    body = {"model": "up-slow", "prompt": "a b c", "max_tokens": max_tokens, "stream": True}
    url = f"http://127.0.0.1:{port}/v1/completions"
    reply = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, stream=True, timeout=60)
    assert reply.status_code == 200
    assert next(reply.iter_lines()).startswith(b"data: ")  # mid-stream
    return reply


def assert_run_by_its_process(job_id: str, tmp_path: Path) -> None:
    job = Job.objects.get(id=job_id)
    assert job.status == Job.Status.RUNNING
    runner = f"web@{upstreamjobs.HOST}/"
    assert job.worker.startswith(runner)  # the process that runs it, by its journal
    assert f"{job.worker.removeprefix(runner)}.journal" in journals(tmp_path)


def assert_ended_refunded_by_the_next(live, tmp_path: Path, job_id: str, key: str, next_one: str) -> None:
    _port, web = started(gateway_env(live, tmp_path, next_one))
    try:
        wait_until(lambda: Job.objects.get(id=job_id).status == Job.Status.FAILED, 20, "the orphan to be ended")
    finally:
        processes.stop(web)
    job = Job.objects.get(id=job_id)
    assert (job.error_code, job.refunded) == (upstreamjobs.GATEWAY_LOST, True)
    row = key_row(key)
    assert (row.calls_used, row.tokens_used) == (0, 0)  # refunded, its reservation released
    day = UsageDay.objects.get(api_key=row)
    assert (day.failed, day.refunded, day.succeeded) == (1, 1, 0)


@pytest.mark.parametrize("next_one", ["write_behind = true", "write_behind = false"])
def test_a_web_process_killed_mid_call_leaves_its_job_to_the_next_which_refunds_it(
    live, env, make_key, tmp_path, next_one
):
    port, web = started(env)
    try:
        key = make_key(max_calls=5)
        with streaming_slowly(port, key, max_tokens=50) as reply:
            job_id = reply.headers["X-Request-Id"]
            assert_run_by_its_process(job_id, tmp_path)
            assert key_row(key).calls_used == 1
            os.killpg(web.pid, signal.SIGKILL)
    finally:
        os.killpg(web.pid, signal.SIGKILL)
        web.wait(10)
    assert Job.objects.get(id=job_id).status == Job.Status.RUNNING  # nobody left to end it
    assert_ended_refunded_by_the_next(live, tmp_path, job_id, key, next_one)


def test_a_call_still_running_when_a_graceful_stop_gives_up_is_ended_by_the_next(
    live, provider_key, make_key, tmp_path
):
    """Whichever ends the worker after the grace (gunicorn's kill, or its own exit, which
    keeps the journal while a call runs: tests/llmjobs/test_journal.py), the call's job
    is the next process's to end."""
    port, web = started(gateway_env(live, tmp_path, "write_behind = true"))
    key = make_key(max_calls=5)
    body = {"model": "up-patient", "prompt": "a b c", "max_tokens": 300}  # 30 s: past the 10 s grace
    url = f"http://127.0.0.1:{port}/v1/completions"
    headers = {"Authorization": f"Bearer {key}"}
    waiting = threading.Thread(target=cut_short, args=(url, body, headers), daemon=True)
    try:
        waiting.start()
        wait_until(lambda: jobs_of(key), 10, "the call to be admitted")
        (job,) = jobs_of(key)
        assert_run_by_its_process(str(job.id), tmp_path)
    finally:
        processes.stop(web)  # SIGTERM; the grace runs out on the call
    assert Job.objects.get(id=job.id).status == Job.Status.RUNNING
    assert journals(tmp_path)  # kept: a call of its process still ran as it left
    assert_ended_refunded_by_the_next(live, tmp_path, str(job.id), key, "write_behind = true")


def cut_short(url: str, body: dict, headers: dict) -> None:
    """A call whose server goes away before it answers."""
    with contextlib.suppress(requests.ConnectionError):
        requests.post(url, json=body, headers=headers, timeout=60)


def jobs_of(key: str) -> list[Job]:
    return list(Job.objects.filter(api_key=key_row(key), model="up-patient"))
