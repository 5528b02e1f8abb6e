"""Forwarding to OpenAI-compatible providers (Groq, OpenAI, Mistral, Ollama, vLLM, or
another djangollmapi) with a server-side secret the client never sees.

One connection pool per provider and process (`gateway.providers`).
The target is only ever a configured `base_url` chosen by a configured model name;
nothing from the client (headers, fields) reaches the URL or the headers we send, so
the gateway cannot be pointed elsewhere (no SSRF). Provider failures are translated:
unreachable / 5xx → 502, too slow → 504, 4xx → passed through in the OpenAI shape.
Messages never carry the provider's URL, host or secret.

A provider is not trusted to behave: every read waits at most `timeout_s`, a whole
body at most `total_timeout_s`, and no more than `max_response_bytes` of a plain
answer (`max_event_bytes` of one stream line) is ever held in memory; an answer of
the wrong shape is a 502 like any other failure of the provider.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from urllib3 import exceptions as http_errors

from djangollmapi.errors import ApiError
from djangollmapi.routes import UpstreamRoute
from gateway import providers
from llmjobs.models import Job
from llmjobs.upstreamjobs import PROVIDER_SIDE_4XX

log = logging.getLogger(__name__)

PATHS = {Job.Kind.CHAT: "chat/completions", Job.Kind.COMPLETION: "completions", Job.Kind.EMBEDDINGS: "embeddings"}
REQUEST_ID_HEADERS = ("x-request-id", "request-id", "x-groq-id", "openai-request-id")
MAX_ERROR_MESSAGE = 2000
# A provider's error body is read only for its message: more than this is not an error.
MAX_ERROR_BODY_BYTES = 65_536


class UpstreamFailure(ApiError):
    """A provider failure as the client sees it (whether it is refunded is the job
    lifecycle's billing policy, by its status), with what a route and the provider's
    circuit breaker need to know of it: whether it is the provider's (`provider_fault`:
    not our pool or our config), and the provider's `Retry-After`, if it sent one."""

    def __init__(
        self, *args: Any, provider_fault: bool = True, retry_after_s: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.provider_fault, self.retry_after_s = provider_fault, retry_after_s

    @property
    def moves_on(self) -> bool:
        """Whether another backend may succeed where this one failed: the provider was
        unreachable, too slow, failed (5xx, garbage), or refused us rather than the
        request (429 and the like). Its refusal of the request itself (400, 404, 422)
        would be every provider's."""
        return self.status >= 500 or self.status in PROVIDER_SIDE_4XX


def open_response(route: UpstreamRoute, kind: Job.Kind, body: dict[str, Any]) -> providers.ProviderResponse:
    """POST the body to the provider and return the response with its body unread
    (streamed), so both streaming and plain calls start the same way. Any status but
    2xx is raised as an UpstreamFailure after reading the provider's error."""
    target = providers.provider(route.provider)
    secret = route.upstream.secret()
    if route.upstream.api_key_env and not secret:
        log.error("upstream %s: environment variable %s is not set", route.provider, route.upstream.api_key_env)
        raise UpstreamFailure(
            503,
            "upstream_not_configured",
            f"The provider {route.provider!r} is not configured on this server.",
            provider_fault=False,
        )
    sent = target.headers.copy()
    if secret:
        sent["Authorization"] = f"Bearer {secret}"
    try:
        raw = target.pool.urlopen(
            "POST",
            target.path + PATHS[kind],
            body=providers.body_bytes(body),
            headers=sent,
            retries=False,
            redirect=False,
            preload_content=False,
            pool_timeout=route.upstream.timeout_s,
        )
    except (http_errors.NewConnectionError, http_errors.ConnectTimeoutError, http_errors.SSLError) as exc:
        log.warning("upstream %s unreachable: %s", route.provider, type(exc).__name__)
        raise unreachable(route) from None
    except http_errors.EmptyPoolError:
        raise UpstreamFailure(
            503,
            "upstream_busy",
            f"All connections to the provider {route.provider!r} are busy; retry later.",
            provider_fault=False,
        ) from None
    except http_errors.TimeoutError:
        raise too_slow(route) from None
    except (http_errors.HTTPError, OSError) as exc:
        if timed_out(exc):  # the body could not be sent in time
            raise too_slow(route) from None
        # It took the connection, then dropped or garbled it before a status line.
        log.warning("upstream %s failed: %s", route.provider, type(exc).__name__)
        raise UpstreamFailure(
            502, "upstream_error", f"The provider {route.provider!r} closed the connection without answering."
        ) from None
    response = providers.ProviderResponse(raw)
    if response.status_code >= 300:
        try:
            raise failure_from_response(route, response)
        finally:
            response.close()
    return response


def timed_out(exc: BaseException) -> bool:
    """A socket timeout, bare or wrapped in urllib3's ProtocolError."""
    return isinstance(exc, TimeoutError) or any(isinstance(arg, TimeoutError) for arg in getattr(exc, "args", ()))


def unreachable(route: UpstreamRoute) -> UpstreamFailure:
    return UpstreamFailure(502, "upstream_unreachable", f"The provider {route.provider!r} could not be reached.")


def too_slow(route: UpstreamRoute) -> UpstreamFailure:
    return UpstreamFailure(
        504,
        "upstream_timeout",
        f"The provider {route.provider!r} did not answer within {route.upstream.timeout_s:g} s.",
    )


def too_long(route: UpstreamRoute) -> UpstreamFailure:
    return UpstreamFailure(
        504,
        "upstream_timeout",
        f"The provider {route.provider!r} did not finish its answer within {route.upstream.total_timeout_s:g} s.",
    )


def too_large(route: UpstreamRoute, limit: int) -> UpstreamFailure:
    log.warning("upstream %s sent more than %s bytes", route.provider, limit)
    return UpstreamFailure(
        502, "upstream_response_too_large", f"The provider {route.provider!r} sent more than {limit} bytes."
    )


def unreadable(route: UpstreamRoute) -> UpstreamFailure:
    return UpstreamFailure(502, "upstream_error", f"The provider {route.provider!r} sent an unreadable answer.")


def unexpected(route: UpstreamRoute, what: str = "answer") -> UpstreamFailure:
    return UpstreamFailure(502, "upstream_error", f"The provider {route.provider!r} sent an unexpected {what}.")


def failure_from_response(route: UpstreamRoute, response: providers.ProviderResponse) -> UpstreamFailure:
    """5xx (and redirects) → 502; 4xx → the provider's error, in our shape."""
    status = response.status_code
    wait_s = retry_after_s(response)
    if status >= 500 or status < 400:
        log.warning("upstream %s answered HTTP %s", route.provider, status)
        return UpstreamFailure(
            502, "upstream_error", f"The provider {route.provider!r} failed (HTTP {status}).", retry_after_s=wait_s
        )
    try:
        error = json.loads(read_body(route, response, MAX_ERROR_BODY_BYTES)).get("error")
    except (UpstreamFailure, ValueError, AttributeError):
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
        retry_after_s=wait_s if status == 429 else None,
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


def retry_after(response: providers.ProviderResponse) -> dict[str, str]:
    value = response.headers.get("retry-after", "")
    return {"Retry-After": value} if value.isdigit() else {}


def retry_after_s(response: providers.ProviderResponse) -> float | None:
    """The provider's `Retry-After` in seconds (a number or an HTTP date), if any."""
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def upstream_request_id(response: providers.ProviderResponse) -> str | None:
    for name in REQUEST_ID_HEADERS:
        value = response.headers.get(name)
        if value and len(value) <= 200 and value.isprintable():
            return value
    return None


def body_chunks(route: UpstreamRoute, response: providers.ProviderResponse) -> Iterator[bytes]:
    """The body as it arrives; a read that waits longer than `timeout_s`, a body not
    done `total_timeout_s` after its headers, or a broken connection is an
    UpstreamFailure."""
    deadline = time.monotonic() + route.upstream.total_timeout_s
    try:
        for chunk in response.iter_bytes():
            if time.monotonic() > deadline:
                raise too_long(route)
            yield chunk
    except http_errors.TimeoutError:
        raise too_slow(route) from None
    except (http_errors.HTTPError, OSError) as exc:
        log.warning("upstream %s broke its answer: %s", route.provider, type(exc).__name__)
        raise UpstreamFailure(
            502, "upstream_error", f"The answer from the provider {route.provider!r} broke off."
        ) from None


def read_body(route: UpstreamRoute, response: providers.ProviderResponse, limit: int) -> bytes:
    """At most `limit` bytes of the body: a longer one (declared or sent) is refused
    as soon as it shows, and the connection dropped with the response."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(route, limit)
    body = bytearray()
    for chunk in body_chunks(route, response):
        body += chunk
        if len(body) > limit:
            raise too_large(route, limit)
    return bytes(body)


def read_json(route: UpstreamRoute, response: providers.ProviderResponse) -> dict[str, Any]:
    """The whole body of a plain (non-stream) answer, a JSON object of at most
    `max_response_bytes`."""
    try:
        data = json.loads(read_body(route, response, route.upstream.max_response_bytes))
    except ValueError:
        raise unreadable(route) from None
    finally:
        response.close()
    if not isinstance(data, dict):
        raise unexpected(route)
    return data


def check_answer(route: UpstreamRoute, kind: Job.Kind, data: dict[str, Any]) -> None:
    """A plain answer has the shape its kind promises (`choices`, or `data` for
    embeddings); an `error` object sent with a 200 is the provider's failure."""
    if data.get("error"):
        raise provider_error(route, data)
    if kind == Job.Kind.EMBEDDINGS:
        if not isinstance(data.get("data"), list):
            raise unexpected(route)
        return
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, dict) for c in choices):
        raise unexpected(route)


def sse_data(route: UpstreamRoute, response: providers.ProviderResponse) -> Iterator[str]:
    """The `data:` payloads of the provider's event stream as they arrive (comments
    and other fields skipped); transport failures become UpstreamFailure."""
    for line in stream_lines(route, body_chunks(route, response)):
        if line.startswith(b"data:"):
            yield line[5:].strip().decode("utf-8", "replace")


def stream_lines(route: UpstreamRoute, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of an event stream (CR, LF or CRLF ends), none longer than
    `max_event_bytes`: a provider that never ends a line is cut off, not buffered."""
    limit = route.upstream.max_event_bytes
    partial = b""
    for chunk in chunks:
        # A CRLF split between chunks reads as an empty line more: SSE ignores it.
        *lines, partial = (partial + chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")).split(b"\n")
        for line in lines:
            if len(line) > limit:
                raise too_large(route, limit)
            yield line
        if len(partial) > limit:
            raise too_large(route, limit)
    if partial:
        yield partial


def usage_numbers(data: dict[str, Any]) -> tuple[int, int] | None:
    """(prompt, completion) tokens from an OpenAI `usage` object, if it has them."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
        return None
    return prompt, completion


def provider_error(route: UpstreamRoute, body: dict[str, Any]) -> UpstreamFailure:
    """An `error` object the provider sent in a 200 answer or inside its stream."""
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    return UpstreamFailure(
        502,
        clean_text(error.get("code"), route) or "upstream_error",
        clean_text(error.get("message"), route) or f"The provider {route.provider!r} failed.",
    )
