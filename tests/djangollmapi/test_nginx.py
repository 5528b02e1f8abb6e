"""nginx's own errors are JSON: the site we ship (config/nginx/djangollmapi.conf),
run by a private nginx in front of the live server, answers every request it refuses
itself (malformed, too large, gunicorn down or too slow) in the API's error shape,
with the right status and `Content-Type: application/json`, and passes the rest
through untouched.

The site is rendered by `render_site`: only the lines that bind it to a host change
(addresses, the certificate, and for one instance the read timeout); every other
line, the error pages included, is the shipped file's. Requests are written on raw
sockets, since the clients that send such requests are not polite HTTP libraries.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from djangollmapi.errors import ERROR_TYPES
from tests.conftest import free_port
from tests.helpers import error_of, wait_until

pytestmark = pytest.mark.faults

NGINX = Path("/usr/sbin/nginx")
SITE = Path(__file__).resolve().parents[2] / "config" / "nginx" / "djangollmapi.conf"
HOST = "api.example.com"  # the site's server_name, kept as shipped
APP_HOST = "127.0.0.1"  # in the test config's allowed_hosts
BODY_LIMIT = 1024 * 1024  # the site's client_max_body_size 1m
REQUEST_LINE_LIMIT = 4094  # gunicorn's limit_request_line; the site's 4k buffers hold it and its CRLF


def require_nginx() -> None:
    """Skip without Debian's nginx package; CI (which installs it) sets
    DLA_REQUIRE_NGINX=1 so a missing nginx fails there instead."""
    if os.access(NGINX, os.X_OK):
        return
    reason = f"{NGINX} is missing (apt-get install nginx)"
    if os.environ.get("DLA_REQUIRE_NGINX") == "1":
        pytest.fail(f"{reason}; DLA_REQUIRE_NGINX=1 requires it")
    pytest.skip(reason)


def render_site(
    site: str, *, upstream: str, https_port: int, http_port: int, cert: Path, key: Path, read_timeout: str = ""
) -> str:
    """The shipped site bound to this test: gunicorn's address in the upstream block
    becomes `upstream`, both servers listen on 127.0.0.1 only (the IPv6 listen lines
    go), the Let's Encrypt paths become the test's self-signed pair, and with
    `read_timeout` every proxy_read_timeout becomes it. Each line must be there
    exactly once, so the test fails loudly when the file changes shape."""
    substitutions = {
        "server 127.0.0.1:8000;": f"server {upstream};",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "listen [::]:80;": "",
        "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
        "listen [::]:443 ssl http2;": "",
        f"/etc/letsencrypt/live/{HOST}/fullchain.pem": str(cert),
        f"/etc/letsencrypt/live/{HOST}/privkey.pem": str(key),
    }
    for old, new in substitutions.items():
        assert site.count(old) == 1, f"{SITE} no longer has {old!r} once; update render_site"
        site = site.replace(old, new)
    if read_timeout:
        site, count = re.subn(r"proxy_read_timeout \d+s;", f"proxy_read_timeout {read_timeout};", site)
        assert count, f"{SITE} has no proxy_read_timeout; update render_site"
    return site


def main_config(directory: Path, site: Path) -> str:
    """What /etc/nginx/nginx.conf is to the installed site: an http block that
    includes it. One process (no workers to switch user or outlive the test), its temp
    files and access log in `directory`, and short client timeouts so a stalled
    client is dropped within the test (the site sets none of its own)."""
    temp = {name: directory / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    temp_paths = "".join(f"    {name}_temp_path {path};\n" for name, path in temp.items())
    return (
        "master_process off;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"{temp_paths}"
        f"    access_log {directory}/access.log;\n"
        "    client_header_timeout 2s;\n"
        "    client_body_timeout 2s;\n"
        f"    include {site};\n"
        "}\n"
    )


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the site's host name and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName(HOST), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@dataclass
class Site:
    """A running nginx serving the rendered site."""

    directory: Path
    https_port: int
    http_port: int
    tls: ssl.SSLContext
    process: subprocess.Popen = field(repr=False)

    @property
    def error_log(self) -> str:
        return (self.directory / "error.log").read_text(errors="replace")


def start_site(directory: Path, upstream: str, cert: tuple[Path, Path], read_timeout: str = "") -> Site:
    require_nginx()
    directory.mkdir(parents=True, exist_ok=True)
    https_port, http_port = free_port(), free_port()
    site = directory / "site.conf"
    site.write_text(
        render_site(
            SITE.read_text(),
            upstream=upstream,
            https_port=https_port,
            http_port=http_port,
            cert=cert[0],
            key=cert[1],
            read_timeout=read_timeout,
        )
    )
    config = directory / "nginx.conf"
    config.write_text(main_config(directory, site))
    settings = f"daemon off; pid {directory}/nginx.pid; error_log stderr;"
    argv = [str(NGINX), "-p", str(directory), "-e", "stderr", "-c", str(config), "-g", settings]
    with (directory / "error.log").open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    tls = ssl.create_default_context(cafile=str(cert[0]))
    result = Site(directory, https_port, http_port, tls, process)

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited ({process.returncode}):\n{result.error_log}")
        try:
            socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
        except OSError:
            return False
        return True

    wait_until(listening, 10, "nginx to listen")
    return result


def stop_site(site: Site) -> None:
    site.process.terminate()  # SIGTERM: nginx's fast shutdown
    try:
        site.process.wait(10)
    except subprocess.TimeoutExpired:
        site.process.kill()
        site.process.wait(5)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    require_nginx()
    return make_certificate(tmp_path_factory.mktemp("nginx-tls"))


@pytest.fixture(scope="module")
def site(live, certificate, tmp_path_factory) -> Iterator[Site]:
    """nginx in front of the live gunicorn."""
    running = start_site(tmp_path_factory.mktemp("nginx"), live.url.removeprefix("http://"), certificate)
    yield running
    stop_site(running)


@dataclass
class Reply:
    """A response read off a raw socket, shaped enough like `requests`' for
    `tests.helpers.error_of`."""

    status: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self):
        return json.loads(self.content)


def connect(site: Site, *, tls: bool = True, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", site.https_port), timeout=timeout)
    return site.tls.wrap_socket(sock, server_hostname=HOST) if tls else sock


def exchange(site: Site, raw: bytes, *, tls: bool = True) -> Reply:
    """Write `raw` as it is and read the one response it gets."""
    with connect(site, tls=tls) as sock:
        sock.sendall(raw)
        return read_reply(sock)


def read_reply(sock: socket.socket) -> Reply:
    response = http.client.HTTPResponse(sock)
    response.begin()
    with response:
        return Reply(response.status, {name.lower(): value for name, value in response.getheaders()}, response.read())


def assert_json_error(reply: Reply, status: int, code: str) -> dict:
    """Our error shape with the given status and code, and the type the API gives
    that status (djangollmapi.errors.ERROR_TYPES)."""
    assert reply.status == status, (reply.status, reply.text[:300])
    assert reply.headers.get("content-type") == "application/json", reply.headers
    assert "<html" not in reply.text.lower()
    error = error_of(reply)
    assert (error["code"], error["type"], error["param"]) == (code, ERROR_TYPES[status], None), error
    return error


def request(head: str, *headers: str, body: bytes = b"", host: str = HOST) -> bytes:
    """A request as bytes: the request line, Host, then `headers`, as written. What
    must reach the app names a host in the test config's allowed_hosts (Django
    answers any other with its own 400)."""
    lines = [head, f"Host: {host}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


CHAT = "POST /v1/chat/completions HTTP/1.1"
HEALTHZ = "GET /healthz HTTP/1.1"
MANY_HEADERS = [f"X-Filler-{n}: {'v' * 40}" for n in range(400)]  # ~20 KB, over 4 x 4k together

BAD_REQUESTS = {
    "a header line over 4k": (request(HEALTHZ, "X-Big: " + "a" * 5000), 431, "request_header_too_large"),
    "headers over 4 x 4k together": (request(HEALTHZ, *MANY_HEADERS), 431, "request_header_too_large"),
    "a request line over 4k": (request(f"GET /{'a' * 10000} HTTP/1.1"), 414, "request_uri_too_long"),
    "Content-Length abc": (request(CHAT, "Content-Length: abc"), 400, "bad_request"),
    "Content-Length -1": (request(CHAT, "Content-Length: -1"), 400, "bad_request"),
    "Content-Length twice": (
        request(CHAT, "Content-Length: 2", "Content-Length: 2", body=b"{}"),
        400,
        "bad_request",
    ),
    "Transfer-Encoding and Content-Length": (
        request(
            CHAT,
            "Content-Length: 7",
            "Transfer-Encoding: chunked",
            body=b"2\r\n{}\r\n0\r\n\r\n",
        ),
        400,
        "bad_request",
    ),
    "a NUL in a header": (request(HEALTHZ, "X-Note: a\x00b"), 400, "bad_request"),
    "no Host in HTTP/1.1": (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "a request line that is not HTTP": (b"HELLO\r\n\r\n", 400, "bad_request"),
    "an HTTP version nginx does not speak": (b"GET / HTTP/9.9\r\n\r\n", 505, "http_version_not_supported"),
    "an unknown Transfer-Encoding": (
        request(CHAT, "Transfer-Encoding: gzip"),
        501,
        "unsupported_transfer_encoding",
    ),
    "TRACE": (request("TRACE / HTTP/1.1"), 405, "method_not_allowed"),
    "a body over client_max_body_size": (
        request(CHAT, f"Content-Length: {BODY_LIMIT + 1}", body=b"x" * (BODY_LIMIT + 1)),
        413,
        "request_too_large",
    ),
    "a chunked body over client_max_body_size": (
        request(CHAT, "Transfer-Encoding: chunked")
        + (b"%x\r\n" % (BODY_LIMIT // 2) + b"x" * (BODY_LIMIT // 2) + b"\r\n") * 3
        + b"0\r\n\r\n",
        413,
        "request_too_large",
    ),
    "a /static/ file that is not there": (request("GET /static/nope.css HTTP/1.1"), 404, "not_found"),
    "one of nginx's error pages, asked for": (request("GET /_errors/500 HTTP/1.1"), 404, "not_found"),
}


@pytest.mark.parametrize("raw, status, code", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_request_nginx_refuses_gets_a_json_error(site, raw, status, code):
    assert_json_error(exchange(site, raw), status, code)


def test_a_request_that_passes_reaches_gunicorn(site):
    reply = exchange(site, request(HEALTHZ, "Connection: close", host=APP_HOST))
    assert (reply.status, reply.json()) == (200, {"status": "ok"})


def test_the_apps_own_errors_pass_through_untouched(site):
    """proxy_intercept_errors is off: the app's 401 keeps its code and header."""
    reply = exchange(site, request("GET /api/usage/ HTTP/1.1", "Connection: close", host=APP_HOST))
    assert_json_error(reply, 401, "missing_api_key")
    assert reply.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("length, status", [(REQUEST_LINE_LIMIT, 404), (REQUEST_LINE_LIMIT + 1, 414)])
def test_nginx_refuses_the_request_lines_gunicorn_would_answer_in_html(site, length, status):
    """gunicorn answers a request line over 4094 bytes with an HTML 400 of its own; the
    site's 4k buffers make nginx refuse it first, while one that fits passes (and
    gets the app's JSON 404)."""
    head = "GET /{} HTTP/1.1"
    head = head.format("a" * (length - len(head.format(""))))
    assert len(head) == length
    reply = exchange(site, request(head, "Connection: close", host=APP_HOST))
    assert_json_error(reply, status, "not_found" if status == 404 else "request_uri_too_long")


def test_many_small_headers_get_a_json_answer(site):
    """nginx has no limit on their count; gunicorn's (100) refuses them, in JSON
    since djangollmapi.webworker writes its errors."""
    headers = [f"X-H{n}: v" for n in range(150)]  # ~1.5 KB: well inside nginx's buffers
    reply = exchange(site, request(HEALTHZ, *headers, "Connection: close", host=APP_HOST))
    assert reply.status == 200 or reply.headers.get("content-type") == "application/json", reply.text[:200]


def test_plain_http_on_the_tls_port_gets_a_json_400(site):
    reply = exchange(site, request(HEALTHZ), tls=False)
    assert_json_error(reply, 400, "https_required")


def test_a_client_that_writes_its_whole_body_first_still_gets_the_json_413(site):
    """urllib writes all of a body before it reads: nginx must drain it (lingering
    close) and answer, not reset the connection under it."""
    url = f"https://127.0.0.1:{site.https_port}/v1/chat/completions"
    body = b"x" * (4 * BODY_LIMIT)
    call = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(call, context=site.tls, timeout=30)
    reply = Reply(refused.value.code, {k.lower(): v for k, v in refused.value.headers.items()}, refused.value.read())
    assert_json_error(reply, 413, "request_too_large")


def test_a_client_that_stalls_is_dropped_without_an_html_page(site):
    """nginx drops a client that stops sending (client_body_timeout) without an
    answer, so no 408 page is ever sent; what matters is that nothing HTML is."""
    with connect(site) as sock:
        sock.sendall(request(CHAT, "Content-Length: 100", body=b'{"model":'))
        started, received = time.monotonic(), b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received == b"" and time.monotonic() - started < 8


def test_plain_http_redirects_to_https(site):
    with socket.create_connection(("127.0.0.1", site.http_port), timeout=10) as sock:
        sock.sendall(request("GET /v1/models HTTP/1.1", "Connection: close"))
        reply = read_reply(sock)
    assert reply.status == 301 and reply.headers["location"] == f"https://{HOST}/v1/models"


def test_gunicorn_down_is_a_json_503_with_retry_after(certificate, tmp_path):
    down = start_site(tmp_path, f"127.0.0.1:{free_port()}", certificate)  # nothing listens there
    try:
        for head in (HEALTHZ, CHAT):
            reply = exchange(down, request(head, "Content-Length: 2", "Connection: close", body=b"{}"))
            assert_json_error(reply, 503, "server_unavailable")
            assert reply.headers["retry-after"] == "5"
    finally:
        stop_site(down)


def test_gunicorn_too_slow_is_a_json_504(certificate, tmp_path):
    """An upstream that takes the connection and never answers, past a read timeout
    shortened to 1 s for the test (the site's are 60 s and 600 s)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes the handshakes; nobody ever reads
        slow = start_site(tmp_path, f"127.0.0.1:{silent.getsockname()[1]}", certificate, read_timeout="1s")
        try:
            started = time.monotonic()
            reply = exchange(slow, request(CHAT, "Content-Length: 2", body=b"{}"))
            assert_json_error(reply, 504, "gateway_timeout")
            assert 0.9 < time.monotonic() - started < 8
        finally:
            stop_site(slow)


def test_nginx_failing_itself_is_a_json_500(certificate, tmp_path):
    """A body too big for memory goes to client_body_temp_path; with that directory
    gone (a full or broken disk, a cleaner run amok) nginx fails the request."""
    broken = start_site(tmp_path, f"127.0.0.1:{free_port()}", certificate)
    try:
        shutil.rmtree(tmp_path / "client_body")
        (tmp_path / "client_body").write_text("not a directory")
        body = b"x" * (256 * 1024)  # above client_body_buffer_size (16k), below the limit
        reply = exchange(broken, request(CHAT, f"Content-Length: {len(body)}", body=body))
        assert_json_error(reply, 500, "internal_error")
    finally:
        stop_site(broken)
