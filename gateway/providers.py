"""A provider's pooled connections: one urllib3 pool per provider and process,
thread-safe, keep-alive, bounded (urllib3 rather than httpx: a call costs it ~0.18 ms
of CPU here against httpx's ~0.4, and every gateway call pays it), and its answers as
`gateway.upstream` reads them."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import certifi
import urllib3
from django.conf import settings
from urllib3 import HTTPHeaderDict

# Read from a provider's socket at most this much at a time (less when less has come).
READ_BYTES = 65_536


class Provider:
    """A provider's pooled connections and where its API lives. urllib3 keeps no
    cookies, follows no redirects and retries nothing here: a cookie one call's
    provider set never rides on the next (another key's) call, a redirect cannot carry
    the secret to another host, and a POST is never sent twice."""

    def __init__(self, base_url: str, pool: urllib3.HTTPConnectionPool) -> None:
        self.path = urlsplit(base_url).path.rstrip("/") + "/"
        self.pool = pool
        # Every call's headers but its secret: the config's, then ours, by name whatever its case.
        self.headers = HTTPHeaderDict(pool.headers)
        self.headers["Accept"] = "application/json, text/event-stream"
        self.headers["Content-Type"] = "application/json"


class ProviderResponse:
    """A provider's answer with its body unread: its status, its headers, its body as it
    arrives, and `close`, which hands the connection back to the pool (kept alive when
    the body was read to its end, else dropped: the provider stops a stream it cannot
    send)."""

    def __init__(self, raw: urllib3.BaseHTTPResponse) -> None:
        self.raw = raw
        self.status_code = raw.status
        self.headers = raw.headers
        self.ended = False

    def iter_bytes(self) -> Iterator[bytes]:
        while chunk := self.raw.read1(READ_BYTES):
            yield chunk
        self.ended = True

    def close(self) -> None:
        if not self.ended:
            self.raw.close()  # the socket goes; its place in the pool stays
        self.raw.release_conn()


@functools.cache
def provider(name: str) -> Provider:
    """The provider's pooled connections, built on first use in each process (after fork)."""
    upstream = next(u for u in settings.LLM_CONFIG.upstreams if u.name == name)
    parts = urlsplit(upstream.base_url)
    tls = {"ca_certs": certifi.where()} if parts.scheme == "https" else {}
    pool = urllib3.connection_from_url(
        upstream.base_url,
        maxsize=upstream.max_connections,
        block=True,  # a full pool waits (`timeout_s`), then answers 503 upstream_busy
        # The body is sent under the connect timeout (urllib3 has no write timeout of its
        # own; a body is at most max_body_bytes), the answer read under timeout_s.
        timeout=urllib3.Timeout(connect=upstream.connect_timeout_s, read=upstream.timeout_s),
        retries=False,
        # Uncompressed, so the bytes we count are the bytes we hold (no gzip bomb);
        # the config's `headers` may ask for compression again (read decoded, bounded).
        headers={"Accept-Encoding": "identity", **dict(upstream.headers)},
        **tls,
    )
    return Provider(upstream.base_url, pool)


def body_bytes(body: dict[str, Any]) -> bytes:
    """The request body as JSON: compact, UTF-8, no NaN (which JSON has not)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
