"""`manage.py serve --demo`: the embedded profile from nothing to a working curl line,
and Ctrl-C leaves no process behind."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
STRIPPED_ENV = ("DATABASE_URL", "REDIS_URL", "DJANGO_LLM_API_DATA_DIR", "DLA_TEST_EMBEDDED_REDIS")


def start_serve(config: Path, **popen) -> subprocess.Popen:
    """`manage.py serve --demo` on `config` as a user starts it: none of the suite's own
    services in its environment, its output a text pipe."""
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}
    env.update(DJANGO_LLM_API_CONFIG=str(config), DJANGO_SETTINGS_MODULE="djangollmapi.settings", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "serve", "--demo"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of live processes whose environment has name=value."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def read_until(process, marker: str, timeout_s: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if marker in line:
            return lines
    raise AssertionError("serve did not get ready:\n" + "\n".join(lines))


def request_from_curl(line: str) -> requests.Response:
    """Send exactly what the printed curl line would send."""
    words = shlex.split(line)
    assert words[0] == "curl"
    url = next(word for word in words if word.startswith("http"))
    headers = dict(words[i + 1].split(": ", 1) for i, word in enumerate(words) if word == "-H")
    data = words[words.index("-d") + 1]
    return requests.post(url, headers=headers, data=data, timeout=30)


@pytest.fixture
def served(tmp_path):
    port = free_port()
    config = tmp_path / "djangollmapi.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\nport = {port}\n'
        '[[deployments]]\nname = "echo"\nalgorithm = "algorithms.echo:Echo"\n'
        # a model never prepared: serve says so at start, its calls get 503 model_unavailable
        '[[deployments]]\nname = "unprepared"\nalgorithm = "algorithms.transformers_lm:TextGeneration"\n'
        'options = { model_path = "never-prepared" }\n'
    )
    # As a shell starts a background job: SIGINT arrives ignored, Ctrl-C must still work.
    process = start_serve(config, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    yield process, str(config)
    if process.poll() is None:
        process.kill()


def test_serve_demo_prints_a_working_curl_line_and_stops_cleanly(served):
    process, config = served
    lines = read_until(process, "serving on", timeout_s=120)
    output = "\n".join(lines)
    assert "demo key: dla_" in output
    assert "user 'admin'  password " in output
    assert "model 'unprepared' on cpu failed to load: FileNotFoundError: no model directory" in output

    curl = next(line.strip() for line in lines if line.strip().startswith("curl "))
    response = request_from_curl(curl)
    assert response.status_code == 200, response.text
    assert response.json()["message"] == "What is the capital of France?"
    streamed = next(line.strip() for line in lines if line.strip().startswith("curl -sN "))
    events = [e.removeprefix("data: ") for e in request_from_curl(streamed).text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == "Name three colours."  # echo answers with the question
    assert len(processes_with_env("DJANGO_LLM_API_CONFIG", config)) >= 4  # serve, redis, worker, web

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    wait_until(lambda: not processes_with_env("DJANGO_LLM_API_CONFIG", config), 10, "every child stopping")
    assert processes_with_env("DJANGO_LLM_API_CONFIG", config) == []
