"""gunicorn's gthread worker, made safe to face clients directly.

gthread hands a connection to a request thread at its first readable byte, and the
thread then reads the rest of the request with no timeout: 70 sockets that send half a
request (or a byte every 5 s) hold every thread and stall the whole API. nginx in front
absorbs that in production, but `serve` and `make run HOST=0.0.0.0` face clients
themselves. This worker reads each request's head and body in its event loop,
non-blocking, and hands the request to a thread only once it is all there, so a slow
socket costs a buffer and a selector entry, never a thread:

- an incomplete request is cut with a JSON 408 after `[server] header_timeout_s` (line
  and headers) or `body_timeout_s` (the body); a connection that sends nothing is closed;
- a body over `[server] max_body_bytes` is not read: Django answers 413 from the headers,
  then this loop reads the body to its end and drops it before closing, so a client that
  writes its whole body before reading (Python's urllib) gets the answer, not a reset;
- what gunicorn's parser refuses (a bad request line, headers too large or too many,
  Content-Length `abc` / `-1` / twice, Transfer-Encoding with Content-Length, a NUL) is
  answered in our JSON error shape, not gunicorn's HTML page.

Why not granian, whose Rust I/O reads slow heads without a thread and whose floor is
faster: a slow *body* holds one of its blocking threads (WSGI reads the body there), so
80 sockets dripping body bytes stalled it as 70 stalled gthread (`bench/faults.py`
measures all three side by side); and hyper answers protocol errors itself with empty
bodies, with no hook to make them JSON.
"""

from __future__ import annotations

import errno
import json
import re
import selectors
import time
from contextlib import suppress
from functools import partial

from gunicorn import util
from gunicorn.workers.gthread import TConn, ThreadWorker

from djangollmapi import draining

HEAD_END = b"\r\n\r\n"
RECV_BYTES = 256 * 1024
SWEEP_EVERY_S = 0.5
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
TRANSFER_ENCODING = re.compile(rb"\r\ntransfer-encoding[ \t]*:", re.IGNORECASE)
EXPECT_CONTINUE = re.compile(rb"\r\nexpect[ \t]*:[ \t]*100-continue[ \t]*(?=\r\n)", re.IGNORECASE)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# gunicorn's status for what its parser refuses -> our stable error code.
PROTOCOL_CODES = {
    400: "bad_request",
    403: "forbidden",
    408: "request_timeout",
    413: "request_too_large",
    431: "request_header_too_large",
    500: "server_error",
    501: "unsupported_transfer_encoding",
}
REQUEST_TIMEOUT = "Request Timeout"


def json_error_bytes(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response carrying our JSON error; the connection closes after it."""
    from djangollmapi.errors import error_body

    code = PROTOCOL_CODES.get(status, "bad_request")
    body = json.dumps(error_body(status, code, message[:300] or "The server could not handle the request.")).encode()
    count_error(code)
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def count_error(code: str) -> None:
    """Counted like every other error (`dla_errors_total{code}`), best effort: this runs
    below Django, where a metrics failure must not cost the client its answer."""
    with suppress(Exception):
        from djangollmapi import metrics

        metrics.ERRORS.labels(code).inc()


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """Stands in for `gunicorn.util.write_error` (its HTML page), with its signature."""
    sock.sendall(json_error_bytes(status_int, reason, mesg))


class Request:
    """What the event loop knows of a request while it is still arriving."""

    __slots__ = ("data", "deadline", "drain_left", "head_end", "need")

    def __init__(self, deadline: float) -> None:
        self.data = bytearray()
        self.deadline = deadline
        self.head_end = -1  # index just past the blank line, once it has arrived
        self.need = -1  # bytes of head + body to have before a thread may take it
        self.drain_left = -1  # >= 0: answered 413, dropping this many more body bytes


class BufferingThreadWorker(ThreadWorker):
    """gthread with requests read whole in the event loop before a thread takes them."""

    def init_process(self) -> None:
        util.write_error = write_json_error  # this worker process only: JSON, not HTML
        self.reading: dict[TConn, Request] = {}
        self.next_sweep = 0.0
        super().init_process()  # loads the app (Django), then runs the loop

    def load_wsgi(self) -> None:
        super().load_wsgi()
        from django.conf import settings

        server = settings.LLM_CONFIG.server
        self.header_timeout_s = server.header_timeout_s
        self.body_timeout_s = server.body_timeout_s
        self.max_body_bytes = server.max_body_bytes
        # Past this without a blank line, the parser takes it and answers 431 / 400.
        cfg = self.cfg
        self.max_head_bytes = cfg.limit_request_line + cfg.limit_request_fields * (cfg.limit_request_field_size + 2) + 4
        from llmjobs import upstreamjobs

        # With write-behind off too: it proves this process alive to the others, and
        # its writer first writes what dead ones left, then ends what they were running.
        upstreamjobs.runner()  # says so if it cannot be made: records are then written at once

    def run(self) -> None:
        try:
            super().run()
        finally:
            from llmjobs import journal

            journal.close()  # what this process answered is written before it goes

    @property
    def buffering(self) -> bool:
        return not self.cfg.is_ssl  # TLS terminates in the thread; leave gthread as it is

    def accept(self, server, listener) -> None:
        if not self.buffering:
            return super().accept(server, listener)
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        conn = TConn(self.cfg, sock, client, server)
        self.nr_conns += 1
        self.reading[conn] = Request(time.monotonic() + self.header_timeout_s)
        with self._lock:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def on_client_socket_readable(self, conn: TConn, client) -> None:
        if not self.buffering:
            return super().on_client_socket_readable(conn, client)
        request = self.reading.get(conn)
        if request is None:  # a kept-alive connection: its next request begins
            with self._lock:
                try:
                    self._keep.remove(conn)
                except ValueError:
                    return  # closed as idle meanwhile
            request = self.reading[conn] = Request(time.monotonic() + self.header_timeout_s)
        try:
            chunk = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close_connection(conn)
        elif request.drain_left >= 0:
            self.drop_body(conn, request, len(chunk))
        else:
            request.data += chunk
            self.advance(conn, request, len(chunk))

    def advance(self, conn: TConn, request: Request, arrived: int) -> None:
        """Hand the request to a thread once whole; refuse an oversized body here."""
        if request.head_end < 0:
            start = max(0, len(request.data) - arrived - 3)
            found = request.data.find(HEAD_END, start)
            if found < 0:
                if len(request.data) > self.max_head_bytes:
                    self.dispatch(conn)
                return
            request.head_end = found + len(HEAD_END)
            length = self.body_length(conn, request)
            if length is None:
                self.dispatch(conn)  # no body, chunked, or a length the parser will refuse
                return
            if length > self.max_body_bytes:
                # Django answers 413 at once (with CORS, the request log, the metrics);
                # the rest of the body is read and dropped after that answer.
                conn.unread_body = length - (len(request.data) - request.head_end)
                self.dispatch(conn)
                return
            request.need = request.head_end + length
            request.deadline = time.monotonic() + self.body_timeout_s
        if len(request.data) >= request.need:
            self.dispatch(conn)

    def body_length(self, conn: TConn, request: Request) -> int | None:
        """The body's length from the head, or None when the parser should judge it.
        Answers `Expect: 100-continue` here and drops that header, or the client would
        wait for a `100` the thread only sends once it has the request."""
        head = bytes(request.data[: request.head_end])
        lengths = CONTENT_LENGTH.findall(head)
        if TRANSFER_ENCODING.search(head) or len(lengths) != 1 or not lengths[0].strip().isdigit():
            return None
        length = int(lengths[0].strip())
        if length and length <= self.max_body_bytes and EXPECT_CONTINUE.search(head):
            stripped = EXPECT_CONTINUE.sub(b"", head)
            request.data[: request.head_end] = stripped
            request.head_end = len(stripped)
            self.send_now(conn, CONTINUE)
        return length or None

    def handle_request(self, req, conn: TConn) -> bool:
        keepalive = super().handle_request(req, conn)
        return keepalive and not getattr(conn, "unread_body", 0)

    def finish_request(self, fs) -> None:
        """Runs in the request's thread. A connection whose body was refused unread
        is not closed yet: the event loop reads that body and drops it first, because
        a close with unread input makes the kernel send a reset, which destroys the
        answer in the client's buffer before a client that writes its whole body
        first (Python's urllib) ever reads it."""
        conn = fs.conn
        unread = getattr(conn, "unread_body", 0)
        if not self.buffering or fs.cancelled() or fs.exception() or not unread or fs.result()[0]:
            return super().finish_request(fs)
        conn.unread_body = 0
        request = Request(time.monotonic() + self.body_timeout_s)
        request.drain_left = unread
        conn.sock.setblocking(False)
        self.reading[conn] = request
        with self._lock:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_client_socket_readable, conn))

    def drop_body(self, conn: TConn, request: Request, count: int) -> None:
        request.drain_left -= count
        if request.drain_left <= 0:
            self.close_connection(conn)

    def send_now(self, conn: TConn, data: bytes) -> None:
        """A short answer on a non-blocking socket: it fits the socket's send buffer."""
        with suppress(OSError):
            conn.sock.send(data)

    def dispatch(self, conn: TConn) -> None:
        """The request is whole (or the parser must judge it): a thread takes it, reading
        first what arrived here, then the socket, as gthread would have."""
        request = self.reading.pop(conn)
        with self._lock:
            self.poller.unregister(conn.sock)
        conn.init()
        conn.parser.unreader.unread(bytes(request.data))
        self._wrap_future(self.tpool.submit(self.handle, conn), conn)

    def close_connection(self, conn: TConn) -> None:
        self.reading.pop(conn, None)
        with self._lock, suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        conn.close()

    def handle_exit(self, sig, frame) -> None:
        """SIGTERM: stop accepting, and end waits on jobs inside the grace, answered."""
        super().handle_exit(sig, frame)
        draining.begin(self.cfg.graceful_timeout)

    def murder_keepalived(self) -> None:
        super().murder_keepalived()
        if self.buffering:
            self.cut_slow_requests()

    def cut_slow_requests(self) -> None:
        """408 for each request still arriving past its deadline (twice a second at most:
        the loop turns on every event, and hundreds of slow sockets may be open)."""
        now = time.monotonic()
        if now < self.next_sweep:
            return
        self.next_sweep = now + SWEEP_EVERY_S
        # list() copies in one step under the GIL: request threads add connections to drain.
        for conn, request in [(c, r) for c, r in list(self.reading.items()) if r.deadline <= now]:
            if request.data and request.drain_left < 0:
                part = "body" if request.head_end >= 0 else "headers"
                timeout = self.body_timeout_s if request.head_end >= 0 else self.header_timeout_s
                message = f"The request's {part} did not arrive within {timeout:g} s."
                self.send_now(conn, json_error_bytes(408, REQUEST_TIMEOUT, message))
            self.close_connection(conn)
