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
from typing import Any

import httpx
from django.conf import settings

from djangollmapi.errors import ApiError
from djangollmapi.routes import UpstreamRoute
from llmjobs.models import Job

log = logging.getLogger(__name__)

PATHS = {Job.Kind.CHAT: "chat/completions", Job.Kind.COMPLETION: "completions", Job.Kind.EMBEDDINGS: "embeddings"}
REQUEST_ID_HEADERS = ("x-request-id", "request-id", "x-groq-id", "openai-request-id")
MAX_ERROR_MESSAGE = 2000


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
    """A provider failure as the client sees it (whether it is refunded is the job
    lifecycle's billing policy, by its status)."""


def open_response(route: UpstreamRoute, kind: Job.Kind, body: dict[str, Any]) -> httpx.Response:
    """POST the body to the provider and return the response with its body unread
    (streamed), so both streaming and plain calls start the same way. Any status but
    2xx is raised as an UpstreamFailure after reading the provider's error."""
    client = http_client(route.provider)
    headers = {"Accept": "application/json, text/event-stream"}
    secret = route.upstream.secret()
    if route.upstream.api_key_env and not secret:
        log.error("upstream %s: environment variable %s is not set", route.provider, route.upstream.api_key_env)
        raise UpstreamFailure(
            503, "upstream_not_configured", f"The provider {route.provider!r} is not configured on this server."
        )
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    request = client.build_request("POST", PATHS[kind], json=body, headers=headers)
    try:
        response = client.send(request, stream=True)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        log.warning("upstream %s unreachable: %s", route.provider, type(exc).__name__)
        raise unreachable(route) from None
    except httpx.PoolTimeout:
        raise UpstreamFailure(
            503, "upstream_busy", f"All connections to the provider {route.provider!r} are busy; retry later."
        ) from None
    except httpx.TimeoutException:
        raise too_slow(route) from None
    except httpx.HTTPError as exc:
        log.warning("upstream %s failed: %s", route.provider, type(exc).__name__)
        raise unreachable(route) from None
    if response.status_code >= 300:
        try:
            raise failure_from_response(route, response)
        finally:
            response.close()
    return response


def unreachable(route: UpstreamRoute) -> UpstreamFailure:
    return UpstreamFailure(502, "upstream_unreachable", f"The provider {route.provider!r} could not be reached.")


def too_slow(route: UpstreamRoute) -> UpstreamFailure:
    return UpstreamFailure(
        504,
        "upstream_timeout",
        f"The provider {route.provider!r} did not answer within {route.upstream.timeout_s:g} s.",
    )


def failure_from_response(route: UpstreamRoute, response: httpx.Response) -> UpstreamFailure:
    """5xx (and redirects) → 502; 4xx → the provider's error, in our shape."""
    status = response.status_code
    if status >= 500 or status < 400:
        log.warning("upstream %s answered HTTP %s", route.provider, status)
        return UpstreamFailure(502, "upstream_error", f"The provider {route.provider!r} failed (HTTP {status}).")
    try:
        response.read()
        error = response.json().get("error")
    except (httpx.HTTPError, ValueError, AttributeError):
        error = None
    if not isinstance(error, dict):
        error = {"message": f"The provider {route.provider!r} refused the request (HTTP {status})."}
    message = clean_text(error.get("message"), route) or f"HTTP {status}"
    return UpstreamFailure(
        status,
        clean_text(error.get("code"), route) or f"upstream_{status}",
        # Whose refusal it is, so a 401 about our secret there is not read as the client's key.
        f"The provider {route.provider!r} refused the request: {message}",
        param=clean_text(error.get("param"), route),
        headers=retry_after(response),
    )


def clean_text(value: Any, route: UpstreamRoute) -> str | None:
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


def read_json(route: UpstreamRoute, response: httpx.Response) -> dict[str, Any]:
    """The whole body of a plain (non-stream) answer."""
    try:
        response.read()
        data = response.json()
    except httpx.TimeoutException:
        raise too_slow(route) from None
    except (httpx.HTTPError, ValueError):
        raise UpstreamFailure(
            502, "upstream_error", f"The provider {route.provider!r} sent an unreadable answer."
        ) from None
    finally:
        response.close()
    if not isinstance(data, dict):
        raise UpstreamFailure(502, "upstream_error", f"The provider {route.provider!r} sent an unexpected answer.")
    return data


def sse_data(route: UpstreamRoute, response: httpx.Response) -> Iterator[str]:
    """The `data:` payloads of the provider's event stream as they arrive (comments
    and other fields skipped); transport failures become UpstreamFailure."""
    try:
        for line in response.iter_lines():
            if line.startswith("data:"):
                yield line[5:].strip()
    except httpx.TimeoutException:
        raise too_slow(route) from None
    except httpx.HTTPError as exc:
        log.warning("upstream %s stream broke: %s", route.provider, type(exc).__name__)
        raise UpstreamFailure(
            502, "upstream_error", f"The stream from the provider {route.provider!r} broke."
        ) from None


def usage_numbers(data: dict[str, Any]) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI `usage` object, if it has them."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        return None
    return prompt, completion


def error_in_stream(route: UpstreamRoute, event: dict[str, Any]) -> UpstreamFailure:
    error = event.get("error") if isinstance(event.get("error"), dict) else {}
    return UpstreamFailure(
        502,
        clean_text(error.get("code"), route) or "upstream_error",
        clean_text(error.get("message"), route) or f"The provider {route.provider!r} failed mid-stream.",
    )
