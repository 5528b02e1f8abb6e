"""A minimal OpenAI-compatible provider for gateway benchmarks: fixed answers, no model.

`POST /v1/chat/completions` answers a fixed small `chat.completion` with `usage` at once;
with `"stream": true` it sends a few `chat.completion.chunk` SSE events (chunked
transfer encoding, so the connection stays alive), the usage chunk when
`stream_options.include_usage` asks for it, then `data: [DONE]`. `GET /v1/models` lists
the one model. Anything else is a 404 in OpenAI's error shape; a wrong bearer (when
`--api-key` is given) is a 401.

It is the standard library's ThreadingHTTPServer (a thread per connection, HTTP/1.1
keep-alive, Nagle off, no access log): real HTTP, cheap and steady, so that what a
benchmark measures through a gateway is the gateway, not the provider. It answers
loopback only.

    python bench/fake_upstream.py --port 8901 [--api-key sk-fake] [--model fake-model]
"""

from __future__ import annotations

import argparse
import json
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER_TEXT = "Hello from the fake upstream."
STREAM_PIECES = ("Hello", " from", " the", " fake", " upstream.")
PROMPT_TOKENS = 12
COMPLETION_TOKENS = len(STREAM_PIECES)
MAX_BODY_BYTES = 1 << 20


def usage() -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }


def completion(model: str) -> dict[str, Any]:
    """The non-streamed answer: one choice, stop, usage."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": ANSWER_TEXT},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": usage(),
    }


def chunk(model: str, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def stream_events(model: str, include_usage: bool) -> list[bytes]:
    """The SSE events of a streamed answer, each `data: ...\\n\\n`, as OpenAI sends them."""
    events = [chunk(model, {"role": "assistant", "content": ""}, None)]
    events += [chunk(model, {"content": piece}, None) for piece in STREAM_PIECES]
    events.append(chunk(model, {}, "stop"))
    if include_usage:
        last = chunk(model, {}, None)
        last["choices"] = []
        last["usage"] = usage()
        events.append(last)
    encoded = [b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n" for event in events]
    return [*encoded, b"data: [DONE]\n\n"]


class Handler(BaseHTTPRequestHandler):
    """One keep-alive connection; every answer carries a length (or is chunked)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: never wait for an ACK between them
    server_version = "fake-upstream/1"
    sys_version = ""
    api_key = ""
    model = "fake-model"

    def log_message(self, format: str, *args: Any) -> None:
        """No access log: it would cost more than the answer."""

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", "req-fake")
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status: int, message: str, code: str) -> None:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        self.send_json(status, {"error": error})

    def authorised(self) -> bool:
        if not self.api_key or self.headers.get("Authorization") == f"Bearer {self.api_key}":
            return True
        self.send_error_json(HTTPStatus.UNAUTHORIZED, "Incorrect API key provided.", "invalid_api_key")
        return False

    def do_GET(self) -> None:
        if not self.authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            model = {"id": self.model, "object": "model", "created": 0, "owned_by": "bench"}
            self.send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
        else:
            self.send_error_json(HTTPStatus.NOT_FOUND, f"Unknown path {self.path}", "not_found")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(min(length, MAX_BODY_BYTES))  # always drain the body: the connection is reused
        if not self.authorised():
            return
        if self.path != "/v1/chat/completions":
            self.send_error_json(HTTPStatus.NOT_FOUND, f"Unknown path {self.path}", "not_found")
            return
        try:
            body = json.loads(raw)
            model = str(body.get("model") or self.model)
        except (ValueError, AttributeError):
            self.send_error_json(HTTPStatus.BAD_REQUEST, "The body is not a JSON object.", "invalid_json")
            return
        if body.get("stream"):
            options = body.get("stream_options") or {}
            self.send_stream(stream_events(model, bool(options.get("include_usage"))))
        else:
            self.send_json(HTTPStatus.OK, completion(model))

    def send_stream(self, events: list[bytes]) -> None:
        """Each event its own chunk, flushed at once, as a provider sends tokens."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", "req-fake")
        self.end_headers()
        for event in events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.write(b"0\r\n\r\n")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the listen backlog: many clients connect at once at the start of a case


def serve(port: int, api_key: str, model: str) -> None:
    Handler.api_key = api_key
    Handler.model = model
    server = Server(("127.0.0.1", port), Handler)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", default="", help="require this bearer token (default: accept any)")
    parser.add_argument("--model", default="fake-model", help="the model GET /v1/models lists")
    args = parser.parse_args()
    serve(args.port, args.api_key, args.model)


if __name__ == "__main__":
    main()
