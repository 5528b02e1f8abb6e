"""Forwarding to OpenAI-compatible providers (Groq, OpenAI, Mistral, Ollama, vLLM, or
another djangollmapi) with a server-side secret the client never sees.

One `httpx.Client` per provider and process: thread-safe, keep-alive, bounded pool.
The target is only ever a configured `base_url` chosen by a configured model name;
nothing from the client (headers, fields) reaches the URL or the headers we send, so
the gateway cannot be pointed elsewhere (no SSRF). Provider failures are translated:
unreachable / 5xx → 502, too slow → 504, 4xx → passed through in the OpenAI shape.
Messages never carry the provider's URL, host or secret.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings

from djangollmapi.config import Upstream, UpstreamModel
from djangollmapi.errors import ApiError

log = logging.getLogger(__name__)

PATHS = {"chat": "chat/completions", "completion": "completions", "embeddings": "embeddings"}
REQUEST_ID_HEADERS = ("x-request-id", "request-id", "x-groq-id", "openai-request-id")
MAX_ERROR_MESSAGE = 2000
# Upstream refusals caused by our side (its secret, its limits), not by the client's
# request: refunded like any server-side failure. 400/404/422 are the client's own.
REFUNDED_STATUSES = {401, 403, 408, 409, 429}


@dataclass(frozen=True)
class Route:
    """A client's model name resolved to a provider and the provider's own name."""

    upstream: Upstream
    model: UpstreamModel

    @property
    def name(self) -> str:
        return self.upstream.name


def route_for(model: Any) -> Route | None:
    if not isinstance(model, str):
        return None
    found = settings.LLM_CONFIG.upstream_for(model)
    return Route(*found) if found else None


@functools.cache
def http_client(name: str) -> httpx.Client:
    """The provider's pooled client, built on first use in each process (after fork)."""
    upstream = next(u for u in settings.LLM_CONFIG.upstreams if u.name == name)
    return httpx.Client(
        base_url=upstream.base_url + "/",
        timeout=httpx.Timeout(upstream.timeout_s, connect=upstream.connect_timeout_s),
        limits=httpx.Limits(
            max_connections=upstream.max_connections, max_keepalive_connections=upstream.max_connections
        ),
        headers=dict(upstream.headers),
        follow_redirects=False,  # a redirect could carry the secret to another host
        trust_env=False,  # no proxy or netrc from the environment
    )


class UpstreamFailure(ApiError):
    """A provider failure as the client sees it; `refund` says whether the call is
    given back (the provider's fault or ours, not the client's)."""

    def __init__(self, status: int, code: str, message: str, refund: bool = True, **kwargs: Any) -> None:
        super().__init__(status, code, message, **kwargs)
        self.refund = refund


def open_response(route: Route, kind: str, body: dict[str, Any]) -> httpx.Response:
    """POST the body to the provider and return the response with its body unread
    (streamed), so both streaming and plain calls start the same way. Any status but
    2xx is raised as an UpstreamFailure after reading the provider's error."""
    client = http_client(route.name)
    headers = {"Accept": "application/json, text/event-stream"}
    secret = route.upstream.secret()
    if route.upstream.api_key_env and not secret:
        log.error("upstream %s: environment variable %s is not set", route.name, route.upstream.api_key_env)
        raise UpstreamFailure(
            503, "upstream_not_configured", f"The provider {route.name!r} is not configured on this server."
        )
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    request = client.build_request("POST", PATHS[kind], json=body, headers=headers)
    try:
        response = client.send(request, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        log.warning("upstream %s unreachable: %s", route.name, type(exc).__name__)
        raise unreachable(route) from None
    except httpx.PoolTimeout:
        raise UpstreamFailure(
            503, "upstream_busy", f"All connections to the provider {route.name!r} are busy; retry later."
        ) from None
    except httpx.TimeoutException:
        raise too_slow(route) from None
    except httpx.HTTPError as exc:
        log.warning("upstream %s failed: %s", route.name, type(exc).__name__)
        raise unreachable(route) from None
    if response.status_code >= 300:
        try:
            raise failure_from_response(route, response)
        finally:
            response.close()
    return response


def unreachable(route: Route) -> UpstreamFailure:
    return UpstreamFailure(502, "upstream_unreachable", f"The provider {route.name!r} could not be reached.")


def too_slow(route: Route) -> UpstreamFailure:
    return UpstreamFailure(
        504, "upstream_timeout", f"The provider {route.name!r} did not answer within {route.upstream.timeout_s:g} s."
    )


def failure_from_response(route: Route, response: httpx.Response) -> UpstreamFailure:
    """5xx (and redirects) → 502; 4xx → the provider's error, in our shape."""
    status = response.status_code
    if status >= 500 or status < 400:
        log.warning("upstream %s answered HTTP %s", route.name, status)
        return UpstreamFailure(502, "upstream_error", f"The provider {route.name!r} failed (HTTP {status}).")
    try:
        response.read()
        error = response.json().get("error")
    except (httpx.HTTPError, ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        error = {"message": f"The provider {route.name!r} refused the request (HTTP {status})."}
    message = clean_text(error.get("message"), route) or f"HTTP {status}"
    return UpstreamFailure(
        status,
        clean_text(error.get("code"), route) or f"upstream_{status}",
        # Whose refusal it is, so a 401 about our secret there is not read as the client's key.
        f"The provider {route.name!r} refused the request: {message}",
        param=clean_text(error.get("param"), route),
        refund=status in REFUNDED_STATUSES,
        headers=retry_after(response),
    )


def clean_text(value: Any, route: Route) -> str | None:
    """A provider's string, bounded and with its secret and base URL blanked out."""
    if value is None:
        return None
    text = str(value)[:MAX_ERROR_MESSAGE]
    for hidden in (route.upstream.secret(), route.upstream.base_url):
        if hidden:
            text = text.replace(hidden, "***")
    return text


def retry_after(response: httpx.Response) -> dict[str, str]:
    value = response.headers.get("retry-after", "")
    return {"Retry-After": value} if value.isdigit() else {}


def upstream_request_id(response: httpx.Response) -> str | None:
    for name in REQUEST_ID_HEADERS:
        value = response.headers.get(name)
        if value and len(value) <= 200 and value.isprintable():
            return value
    return None


def read_json(route: Route, response: httpx.Response) -> dict[str, Any]:
    """The whole body of a plain (non-stream) answer."""
    try:
        response.read()
        data = response.json()
    except httpx.TimeoutException:
        raise too_slow(route) from None
    except (httpx.HTTPError, ValueError):
        raise UpstreamFailure(
            502, "upstream_error", f"The provider {route.name!r} sent an unreadable answer."
        ) from None
    finally:
        response.close()
    if not isinstance(data, dict):
        raise UpstreamFailure(502, "upstream_error", f"The provider {route.name!r} sent an unexpected answer.")
    return data


def sse_data(route: Route, response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of the provider's event stream as they arrive (comments
    and other fields skipped); transport failures become UpstreamFailure."""
    try:
        for line in response.iter_lines():
            if line.startswith("data:"):
                yield line[5:].strip()
    except httpx.TimeoutException:
        raise too_slow(route) from None
    except httpx.HTTPError as exc:
        log.warning("upstream %s stream broke: %s", route.name, type(exc).__name__)
        raise UpstreamFailure(502, "upstream_error", f"The stream from the provider {route.name!r} broke.") from None


def usage_numbers(data: dict[str, Any]) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI `usage` object, if it has them."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        return None
    return prompt, completion


def error_in_stream(route: Route, event: dict[str, Any]) -> UpstreamFailure:
    error = event.get("error") if isinstance(event.get("error"), dict) else {}
    return UpstreamFailure(
        502,
        clean_text(error.get("code"), route) or "upstream_error",
        clean_text(error.get("message"), route) or f"The provider {route.name!r} failed mid-stream.",
    )
