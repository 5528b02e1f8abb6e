"""A provider that misbehaves: hangs, stalls mid-body, trickles, resets the connection,
sends garbage or the wrong shape with a 200, or far too much. Each call ends in bounded
time with a JSON 502 / 504 (or, once a stream has started, its SSE error event), the
Job failed and the key refunded once.

The provider is a real HTTP peer: a small `http.server` in a thread of this process on
`gateway.bad_port`, which the gateway's `provider-bad` upstream points at (timeout_s 1,
total_timeout_s 2, max_response_bytes 1 MB, max_event_bytes 64 KiB). The model name
it receives picks the misbehaviour; `"stream": true` in the body picks its stream form.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from llmjobs.models import Job
from tests.helpers import error_of, key_row, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.django_db(transaction=True)]

TIMEOUT_S, TOTAL_TIMEOUT_S = 1, 2  # provider-bad's, in tests/conftest.py
SLACK_S = 5  # generous: a bound on the wait, not a speed test
MAX_RESPONSE_BYTES = 1_000_000
HELD_S = 30  # the longest a misbehaving handler keeps its connection
CHUNK = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "tick "}}]}


class BadProvider(BaseHTTPRequestHandler):
    """Reads the request like a provider, then misbehaves as its model says."""

    stop = threading.Event()
    bytes_sent: dict[str, int] = {}
    cookies_heard: list[str | None] = []
    case = ""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        behaviour, stream = body["model"], bool(body.get("stream"))
        self.case = f"{behaviour}_{'stream' if stream else 'plain'}"
        with contextlib.suppress(OSError):  # the gateway gave up and closed: what these tests want
            getattr(self, self.case)()

    def log_message(self, *args) -> None:  # quiet
        pass

    def head(self, content_type: str = "application/json", length: int | None = None) -> None:
        lines = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}", "Connection: close"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def events(self, count: int = 2) -> None:
        self.head("text/event-stream")
        for _ in range(count):
            self.wfile.write(f"data: {json.dumps(CHUNK)}\n\n".encode())

    def hold(self) -> None:
        self.stop.wait(HELD_S)

    def reset(self) -> None:
        """Close with an RST (linger 0), as a crashed peer or a middlebox does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def trickle(self, piece: bytes) -> None:
        """A piece every 0.2 s: never a read timeout, never an end."""
        for _ in range(int(HELD_S / 0.2)):
            self.wfile.write(piece)
            time.sleep(0.2)

    # --- the misbehaviours ------------------------------------------------------

    def hang_plain(self) -> None:
        self.hold()  # the request was taken; no answer ever comes

    hang_stream = hang_plain

    def stall_plain(self) -> None:
        self.head(length=1000)
        self.wfile.write(b'{"id": "x", "choices": [')
        self.hold()

    def stall_stream(self) -> None:
        self.events()
        self.hold()

    def trickle_plain(self) -> None:
        self.head()
        self.trickle(b" ")  # JSON allows any amount of whitespace

    def trickle_stream(self) -> None:
        self.events()
        self.trickle(b": still here\n\n")

    def reset_plain(self) -> None:
        self.reset()

    def reset_stream(self) -> None:
        self.events()
        time.sleep(0.3)  # read before the RST arrives, which drops what is unread
        self.reset()

    def garbage_plain(self) -> None:
        page = b"<html><body>502 Bad Gateway</body></html>"
        self.head("text/html", len(page))
        self.wfile.write(page)

    def garbage_stream(self) -> None:
        self.events()
        self.wfile.write(b"data: <html>oops</html>\n\n")
        self.hold()

    def cookie_plain(self) -> None:
        """A good answer that sets a cookie (a session, a load balancer's affinity)."""
        BadProvider.cookies_heard.append(self.headers.get("Cookie"))
        answer = json.dumps(
            {
                "id": "c1",
                "object": "chat.completion",
                "model": "cookie",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ).encode()
        lines = ["HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {len(answer)}"]
        lines += ["Set-Cookie: session=of-the-first-caller; Path=/", "Connection: close"]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode() + answer)

    def shape_plain(self) -> None:
        answer = json.dumps({"hello": "world"}).encode()
        self.head(length=len(answer))
        self.wfile.write(answer)

    def shape_stream(self) -> None:
        self.events()
        self.wfile.write(b'data: {"hello": "world"}\n\n')
        self.hold()

    def error_plain(self) -> None:
        answer = json.dumps({"error": {"message": "overloaded", "code": "overloaded"}}).encode()
        self.head(length=len(answer))
        self.wfile.write(answer)

    def error_stream(self) -> None:
        self.events()
        self.wfile.write(b'data: {"error": {"message": "overloaded", "code": "overloaded"}}\n\n')
        self.hold()

    def huge_plain(self) -> None:
        """10 MB announced and sent."""
        self.head(length=10_000_000)
        self.send_counted(10_000_000)

    def huge_stream(self) -> None:
        """One line that never ends."""
        self.events()
        self.wfile.write(b'data: {"choices": [{"delta": {"content": "')
        self.send_counted(200_000_000)

    def endless_plain(self) -> None:
        """No length: a body until the reader stops reading (a JSON string that never closes)."""
        self.head()
        self.wfile.write(b'{"choices": [{"message": {"content": "')
        self.send_counted(200_000_000)

    def endless_stream(self) -> None:
        """Well-formed chunks of 50,000 characters as fast as the socket takes them."""
        self.events()
        big = {"choices": [{"index": 0, "delta": {"content": "x" * 50_000}}]}
        self.send_counted(200_000_000, f"data: {json.dumps(big)}\n\n".encode())

    def mute_plain(self) -> None:
        """Its headers, then the connection closes: an empty body."""
        self.head()

    def mute_stream(self) -> None:
        self.head("text/event-stream")  # and not one event

    def send_counted(self, total: int, piece: bytes = b"x" * 65_536) -> None:
        sent = 0
        try:
            while sent < total:
                self.wfile.write(piece)
                sent += len(piece)
        finally:
            BadProvider.bytes_sent[self.case] = sent


@pytest.fixture(scope="module")
def bad_provider(gateway) -> Iterator[type[BadProvider]]:
    server = ThreadingHTTPServer(("127.0.0.1", gateway.bad_port), BadProvider)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="bad-provider", daemon=True)
    thread.start()
    try:
        yield BadProvider
    finally:
        BadProvider.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def call(gateway, key: str, behaviour: str, *, stream: bool = False) -> tuple[requests.Response, float]:
    body = {"model": f"bad-{behaviour}", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    started = time.monotonic()
    reply = requests.post(
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=TOTAL_TIMEOUT_S + TIMEOUT_S + SLACK_S + 10,
        stream=stream,
    )
    if reply.headers["Content-Type"].startswith("text/event-stream"):
        reply.events = [line for line in reply.iter_lines() if line.startswith(b"data: ")]
    return reply, time.monotonic() - started


def assert_failed_and_refunded(key: str, code: str) -> None:
    """One job, failed with the code the client saw, its call and tokens given back."""
    (job,) = Job.objects.filter(api_key=key_row(key))
    assert (job.status, job.error_code, job.refunded) == (Job.Status.FAILED, code, True)
    row = key_row(key)
    assert (row.calls_used, row.tokens_used) == (0, 0)


PLAIN = [
    # behaviour, status, code, what bounds the wait
    ("hang", 504, "upstream_timeout", TIMEOUT_S),
    ("stall", 504, "upstream_timeout", TIMEOUT_S),
    ("trickle", 504, "upstream_timeout", TOTAL_TIMEOUT_S + TIMEOUT_S),
    ("reset", 502, "upstream_error", 0),
    ("garbage", 502, "upstream_error", 0),
    ("shape", 502, "upstream_error", 0),
    ("error", 502, "overloaded", 0),
    ("huge", 502, "upstream_response_too_large", 0),
    ("endless", 502, "upstream_response_too_large", 0),
    ("mute", 502, "upstream_error", 0),
]


@pytest.mark.parametrize(("behaviour", "status", "code", "bound_s"), PLAIN, ids=[case[0] for case in PLAIN])
def test_a_misbehaving_provider_is_a_json_error_in_bounded_time(
    gateway, bad_provider, make_key, behaviour, status, code, bound_s
):
    key = make_key(max_calls=5)
    reply, elapsed = call(gateway, key, behaviour)

    assert reply.status_code == status, reply.text
    assert reply.headers["Content-Type"] == "application/json"
    assert error_of(reply)["code"] == code
    assert f"127.0.0.1:{gateway.bad_port}" not in reply.text
    assert elapsed < bound_s + SLACK_S
    assert_failed_and_refunded(key, code)


def test_a_cookie_one_call_got_never_rides_on_the_next(gateway, bad_provider, make_key):
    """The pooled client serves every key: what a provider set for one caller's call
    is not sent with another's. Both calls go over one keep-alive connection, so one
    web process (one pooled client) forwards them."""
    BadProvider.cookies_heard.clear()
    body = {"model": "bad-cookie", "messages": [{"role": "user", "content": "hi"}]}
    with requests.Session() as session:
        replies = [
            session.post(
                f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
            )
            for key in (make_key(), make_key())
        ]

    assert [reply.status_code for reply in replies] == [200, 200], replies[-1].text
    assert "set-cookie" not in {name.lower() for name in replies[0].headers}
    assert BadProvider.cookies_heard == [None, None]


def test_a_body_past_the_cap_is_not_read_on(gateway, bad_provider, make_key):
    """Without the cap the gateway would read the endless body for its whole 2 s; with
    it the provider sees the connection close after about a megabyte (plus what the
    two kernels' socket buffers hold)."""
    bad_provider.bytes_sent.pop("endless_plain", None)
    reply, _ = call(gateway, make_key(), "endless")
    assert error_of(reply)["code"] == "upstream_response_too_large"
    sent = wait_until(lambda: bad_provider.bytes_sent.get("endless_plain"), 10, "the provider to stop")
    assert MAX_RESPONSE_BYTES < sent < 40 * MAX_RESPONSE_BYTES


STREAM = [
    ("stall", 504, "upstream_timeout", TIMEOUT_S),
    ("trickle", 504, "upstream_timeout", TOTAL_TIMEOUT_S + TIMEOUT_S),
    ("reset", 502, "upstream_error", 0),
    ("garbage", 502, "upstream_error", 0),
    ("shape", 502, "upstream_error", 0),
    ("error", 502, "overloaded", 0),
    ("huge", 502, "upstream_response_too_large", 0),
    ("endless", 502, "upstream_response_too_large", 0),
]


@pytest.mark.parametrize(("behaviour", "status", "code", "bound_s"), STREAM, ids=[case[0] for case in STREAM])
def test_a_stream_that_misbehaves_after_it_started_ends_with_an_error_event(
    gateway, bad_provider, make_key, behaviour, status, code, bound_s
):
    key = make_key(max_calls=5)
    reply, elapsed = call(gateway, key, behaviour, stream=True)

    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    *chunks, last = (json.loads(line[len(b"data: ") :]) for line in reply.events)
    assert [chunk["choices"][0]["delta"]["content"] for chunk in chunks[:2]] == ["tick ", "tick "]
    assert last["error"]["code"] == code
    assert last["error"]["type"] == ("timeout_error" if status == 504 else "upstream_error")
    assert elapsed < bound_s + SLACK_S
    assert_failed_and_refunded(key, code)


def test_a_stream_that_ends_before_its_first_event_is_a_json_502(gateway, bad_provider, make_key):
    """Nothing had reached the client: it gets the error a plain call would, with its status."""
    key = make_key(max_calls=5)
    reply, elapsed = call(gateway, key, "mute", stream=True)
    assert (reply.status_code, error_of(reply)["code"]) == (502, "upstream_error")
    assert reply.headers["Content-Type"] == "application/json"
    assert elapsed < SLACK_S
    assert_failed_and_refunded(key, "upstream_error")


def test_a_stream_that_never_starts_is_a_json_504(gateway, bad_provider, make_key):
    key = make_key(max_calls=5)
    reply, elapsed = call(gateway, key, "hang", stream=True)
    assert (reply.status_code, error_of(reply)["code"]) == (504, "upstream_timeout")
    assert elapsed < TIMEOUT_S + SLACK_S
    assert_failed_and_refunded(key, "upstream_timeout")
