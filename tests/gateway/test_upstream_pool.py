"""A provider's connection pool, in-process against a real HTTP server in a thread:
bounded (a full pool answers 503 `upstream_busy` after `timeout_s`, never a hang),
a connection whose answer was cut short gives its place back, and one whose answer was
read to its end is kept alive for the next call."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.test.utils import override_settings

from djangollmapi.config import parse_config
from djangollmapi.routes import route_model
from gateway import upstream
from gateway.upstream import UpstreamFailure
from llmjobs.models import Job

ANSWER = json.dumps({"choices": [{"message": {"role": "assistant", "content": "hi"}}]}).encode()
BODY = {"model": "their-narrow", "messages": [{"role": "user", "content": "hi"}]}


class HoldingProvider(BaseHTTPRequestHandler):
    """Sends its answer's first half at once, the rest once `release` is set; records
    the client port of each request, so reused connections show."""

    protocol_version = "HTTP/1.1"
    release = threading.Event()
    ports: list[int] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).ports.append(self.client_address[1])
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        half = len(ANSWER) // 2
        self.wfile.write(ANSWER[:half])
        self.wfile.flush()
        if self.release.wait(timeout=10):
            with contextlib.suppress(ConnectionError):  # the cut one's client is gone
                self.wfile.write(ANSWER[half:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def narrow() -> Iterator:
    """A route to a provider of one connection, whose first answer is held."""
    HoldingProvider.release.clear()
    HoldingProvider.ports.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), HoldingProvider)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    name = f"narrow-{server.server_address[1]}"  # one pool per name and process
    config = parse_config(
        {
            "upstreams": [
                {
                    "name": name,
                    "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
                    "models": {"narrow": "their-narrow"},
                    "max_connections": 1,
                    "timeout_s": 0.5,
                }
            ]
        },
        "<test>",
        base_dir=Path("/tmp"),
    )
    try:
        with override_settings(LLM_CONFIG=config):
            yield route_model("narrow", config)
    finally:
        HoldingProvider.release.set()
        server.shutdown()
        server.server_close()


def test_a_full_pool_is_a_503_and_a_cut_answer_gives_its_place_back(narrow):
    held = upstream.open_response(narrow, Job.Kind.CHAT, BODY)  # its body half sent
    with pytest.raises(UpstreamFailure) as busy:
        upstream.open_response(narrow, Job.Kind.CHAT, BODY)
    assert (busy.value.status, busy.value.code, busy.value.provider_fault) == (503, "upstream_busy", False)
    held.close()  # cut short: its connection is dropped, its place in the pool freed
    HoldingProvider.release.set()
    answer = upstream.read_json(narrow, upstream.open_response(narrow, Job.Kind.CHAT, BODY))
    assert answer["choices"][0]["message"]["content"] == "hi"


def test_an_answer_read_to_its_end_keeps_its_connection(narrow):
    HoldingProvider.release.set()
    for _ in range(3):
        upstream.read_json(narrow, upstream.open_response(narrow, Job.Kind.CHAT, BODY))
    assert len(HoldingProvider.ports) == 3
    assert len(set(HoldingProvider.ports)) == 1  # one connection, kept alive
