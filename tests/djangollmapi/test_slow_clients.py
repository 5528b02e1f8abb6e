"""The web tier facing clients directly, as `serve` starts it (djangollmapi.webworker):
slow or idle sockets never hold a request thread, incomplete requests are cut with a
JSON 408, and everything below Django answers in our JSON error shape."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, closing, suppress
from urllib.parse import urlsplit

import pytest
import requests
from django.conf import settings

from tests.helpers import error_of

pytestmark = pytest.mark.faults

SLOW_SOCKETS = 300
# How long a valid call may take with the slow sockets open. Not a speed check: stalled,
# it never came back at all (three probes in 70 s); answered, it takes milliseconds.
ANSWER_BOUND_S = 5


def address(live) -> tuple[str, int]:
    parts = urlsplit(live.url)
    return parts.hostname, parts.port


def raw_exchange(live, data: bytes, timeout_s: float = 10) -> bytes:
    """Send raw bytes, then read the whole answer until the server closes."""
    with closing(socket.create_connection(address(live), timeout=timeout_s)) as sock:
        sock.sendall(data)
        return read_to_close(sock)


def read_to_close(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def json_answer(answer: bytes) -> tuple[int, dict]:
    """The status and the JSON error body of a raw HTTP/1.1 answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
    }
    assert headers.get(b"content-type", b"").startswith(b"application/json"), answer[:300]
    if headers.get(b"transfer-encoding") == b"chunked":
        body = dechunk(body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    return status, error


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size, _, rest = body.partition(b"\r\n")
        length = int(size, 16)
        if not length:
            break
        out, body = out + rest[:length], rest[length + 2 :]
    return out


@pytest.fixture
def slow_sockets(live) -> Iterator[list[socket.socket]]:
    """Both stalling patterns, half each: a request line and one header then nothing;
    a whole head announcing a body of which a byte arrives every second."""
    with ExitStack() as stack:
        sockets: list[socket.socket] = []
        for index in range(SLOW_SOCKETS):
            sock = stack.enter_context(closing(socket.create_connection(address(live), timeout=10)))
            if index % 2:
                sock.sendall(b"POST /api/ HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            else:
                sock.sendall(b"POST /api/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9999\r\n\r\n{")
            sockets.append(sock)
        stop = threading.Event()

        def drip() -> None:
            while not stop.wait(1):
                for sock in sockets[::2]:
                    with suppress(OSError):
                        sock.send(b" ")

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        yield sockets
        stop.set()
        dripper.join(5)


def test_valid_calls_are_answered_while_300_slow_sockets_are_open(live, key, slow_sockets):
    for _ in range(5):
        began = time.monotonic()
        response = requests.post(
            live.url + "/api/",
            json={"text": "still here?", "model": "echo"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=ANSWER_BOUND_S,
        )
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "echo", f"answered in {time.monotonic() - began:.3f} s"


def test_a_stream_runs_while_slow_sockets_are_open(live, key, slow_sockets):
    body = {"model": "tiny-gpt2", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with requests.post(
        live.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        stream=True,
        timeout=ANSWER_BOUND_S,
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"


@pytest.mark.parametrize(
    "partial, part",
    [
        (b"POST /api/ HTTP/1.1\r\nHost: 127.0.0.1\r\n", "headers"),
        (b"POST /api/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\n{", "body"),
    ],
    ids=["headers", "body"],
)
def test_an_incomplete_request_is_cut_with_a_json_408(live, partial, part):
    server = settings.LLM_CONFIG.server
    limit = server.header_timeout_s if part == "headers" else server.body_timeout_s
    began = time.monotonic()
    answer = raw_exchange(live, partial, timeout_s=limit + 10)
    waited = time.monotonic() - began
    status, error = json_answer(answer)
    assert (status, error["code"]) == (408, "request_timeout")
    assert part in error["message"]
    assert limit - 0.5 < waited < limit + 10


def test_a_byte_at_a_time_does_not_keep_headers_open_past_their_timeout(live):
    limit = settings.LLM_CONFIG.server.header_timeout_s
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    with closing(socket.create_connection(address(live), timeout=limit + 10)) as sock:
        began = time.monotonic()
        try:
            for byte in head:
                sock.send(bytes([byte]))
                time.sleep(0.2)
        except OSError:
            pass  # cut while still sending
        answer = read_to_close(sock)
    status, error = json_answer(answer)
    assert (status, error["code"]) == (408, "request_timeout")
    assert time.monotonic() - began < limit + 10


def test_a_connection_that_sends_nothing_is_closed(live):
    limit = settings.LLM_CONFIG.server.header_timeout_s
    with closing(socket.create_connection(address(live), timeout=limit + 10)) as sock:
        assert read_to_close(sock) == b""


PROTOCOL_ERRORS = {
    "header too long": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 20000 + b"\r\n\r\n", 431),
    "too many headers": (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n",
        431,
    ),
    "request line too long": (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "content-length abc": (b"POST /api/ HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    "content-length -1": (b"POST /api/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    "content-length twice": (
        b"POST /api/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
    ),
    "transfer-encoding and content-length": (
        b"POST /api/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "nul in a header": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    "not http": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "bad method": (b"G(T /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "bad version": (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", PROTOCOL_ERRORS)
def test_protocol_errors_are_json(live, name):
    data, expected = PROTOCOL_ERRORS[name]
    status, error = json_answer(raw_exchange(live, data))
    assert status == expected
    assert error["type"] in {"invalid_request_error", "server_error"}


def test_a_client_that_writes_its_whole_body_first_gets_the_json_413(live, key):
    """Python's urllib sends all 20 MB before it reads a byte of the answer."""
    limit = settings.LLM_CONFIG.server.max_body_bytes
    request = urllib.request.Request(
        live.url + "/api/",
        data=b"x" * 20_000_000,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413
    error = json.loads(caught.value.read())["error"]
    assert error["code"] == "request_too_large"
    assert str(limit) in error["message"]


def test_expect_100_continue_gets_its_interim_answer_and_the_call_runs(live, key):
    body = json.dumps({"text": "continue", "model": "echo"}).encode()
    head = (
        f"POST /api/ HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with closing(socket.create_connection(address(live), timeout=10)) as sock:
        sock.sendall(head)
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = read_to_close(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"echo"' in answer


def test_keep_alive_serves_several_calls_on_one_connection(live, key):
    with requests.Session() as session:
        for text in ("one", "two", "three"):
            response = session.post(
                live.url + "/api/",
                json={"text": text, "model": "echo"},
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )
            assert response.status_code == 200
    with requests.Session() as session:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        first = session.post(live.url + "/api/", data=b"{" * 10, headers=headers, timeout=10)
        assert first.status_code == 400
        assert error_of(first)["param"] is None or isinstance(error_of(first)["param"], str)
        second = session.get(live.url + "/healthz", timeout=10)
        assert second.status_code == 200
