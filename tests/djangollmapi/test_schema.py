"""The API's own description: the OpenAPI schema at `/api/schema/` validates and shows
every public endpoint with its body; Swagger UI at `/api/docs/` is served entirely by
us (no CDN); both need no key and show nothing secret; and the live server keeps the
promises the schema makes (schemathesis: no 5xx, every answer documented)."""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import hypothesis
import jsonschema
import pytest
import requests
import schemathesis
from django.conf import settings
from django.core.management import call_command
from django.utils import timezone
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks as openapi_checks

from apikeys.models import ApiKey
from tests.conftest import PROVIDER_SECRET

pytestmark = pytest.mark.django_db(transaction=True)

OPENAPI_JSON = {"Accept": "application/vnd.oai.openapi+json"}

# Every operation of the public API, and the component that describes its body.
OPERATIONS = {
    ("/api/", "post"): "RunBody",
    ("/analyze/", "post"): "RunBody",
    ("/api/jobs/", "post"): "RunBody",
    ("/api/jobs/{job_id}/", "get"): None,
    ("/api/usage/", "get"): None,
    ("/v1/models", "get"): None,
    ("/v1/models/{model_id}", "get"): None,
    ("/v1/chat/completions", "post"): "ChatCompletionRequest",
    ("/v1/completions", "post"): "CompletionRequest",
    ("/v1/embeddings", "post"): "EmbeddingsRequest",
    ("/v1/tokenize", "post"): "TokenizeRequest",
    ("/v1/tokenize/count", "post"): "TokenizeRequest",
    ("/extras/tokenize/count", "post"): "TokenizeRequest",
}
# What each body must at least describe: the fields its endpoint reads first.
BODY_FIELDS = {
    "RunBody": {"text", "model"},
    "ChatCompletionRequest": {"model", "messages", "max_tokens", "stream", "stream_options", "temperature", "stop"},
    "CompletionRequest": {"model", "prompt", "max_tokens", "stream"},
    "EmbeddingsRequest": {"model", "input", "encoding_format"},
    "TokenizeRequest": {"model", "messages", "prompt", "input"},
}


def schema_of(reply) -> dict:
    assert reply.status_code == 200, reply.content[:500]
    return json.loads(reply.content)


def test_the_schema_validates_and_shows_every_endpoint_with_its_body(api):
    schema = schema_of(api.get("/api/schema/", headers=OPENAPI_JSON))
    validate(schema)  # OpenAPI 3.1, as openapi-spec-validator reads it
    assert schema["openapi"].startswith("3.1")

    shown = {(path, method) for path, item in schema["paths"].items() for method in item}
    assert shown == set(OPERATIONS)  # no /healthz, /readyz, /metrics, /admin/, no docs views
    components = schema["components"]["schemas"]
    for (path, method), body in OPERATIONS.items():
        operation = schema["paths"][path][method]
        assert operation["security"] == [{"bearerAuth": []}], path
        assert "401" in operation["responses"] and "500" in operation["responses"], path
        if body is None:
            assert "requestBody" not in operation, path
            continue
        content = operation["requestBody"]["content"]
        assert list(content) == ["application/json"], path
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{body}"}, path
        assert BODY_FIELDS[body] <= set(components[body]["properties"]), body
    scheme = schema["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


def test_the_schema_generates_without_a_warning(tmp_path):
    """drf-spectacular warns about a view it cannot describe (a new endpoint without
    its decorator, say): here that fails the build."""
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert (tmp_path / "schema.yaml").read_text().startswith("openapi: 3.1")


def test_the_regex_routes_show_without_their_optional_slash(api):
    paths = schema_of(api.get("/api/schema/", headers=OPENAPI_JSON))["paths"]
    assert not [path for path in paths if path.startswith(("/v1/", "/extras/")) and path.endswith("/")]


def test_a_chat_can_answer_json_or_an_event_stream(api):
    schema = schema_of(api.get("/api/schema/", headers=OPENAPI_JSON))
    answer = schema["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]
    assert set(answer["content"]) == {"application/json", "text/event-stream"}
    assert answer["headers"]["X-Request-Id"]["required"] is True


def test_the_schema_needs_no_key_and_ignores_a_bad_one(api):
    for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        reply = api.get("/api/schema/", headers={**OPENAPI_JSON, **headers})
        assert reply.status_code == 200, (headers, reply.content[:300])
        reply = api.get("/api/docs/", headers=headers)
        assert reply.status_code == 200 and reply["Content-Type"].startswith("text/html"), headers
    yaml = api.get("/api/schema/")  # the default rendering
    assert yaml.status_code == 200 and yaml.content.startswith(b"openapi: 3.1")


def test_the_schema_and_the_docs_show_no_secret(gateway):
    """The gateway's config has upstream providers with secrets, a metrics token and a
    JWT setup: none of it is in the schema or the page."""
    texts = [
        requests.get(gateway.url + "/api/schema/", headers=OPENAPI_JSON, timeout=30).text,
        requests.get(gateway.url + "/api/schema/", timeout=30).text,
        requests.get(gateway.url + "/api/docs/", timeout=30).text,
    ]
    secrets = [PROVIDER_SECRET, settings.SECRET_KEY, settings.LLM_CONFIG.metrics.token, gateway.provider_url]
    for text in texts:
        for secret in secrets:
            assert secret not in text


class References(HTMLParser):
    """Every URL a page loads: `src` and `href` attributes, and the schema Swagger UI
    fetches (`url: "..."` in its inline script)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]

    def handle_data(self, data: str) -> None:
        if self.lasttag == "script":
            self.scripts.append(data)


def test_swagger_ui_is_served_by_us_without_a_cdn(live):
    page = live.get("/api/docs/", headers={"Authorization": "Bearer not-a-key"})
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    parsed = References()
    parsed.feed(page.text)
    schema_urls = re.findall(r'\burl: "([^"]+)"', "".join(parsed.scripts))
    assert len(schema_urls) == 1
    assets = [url for url in parsed.urls if url.endswith((".js", ".css", ".png"))]
    assert len(assets) >= 3, parsed.urls  # the bundle, its preset and the stylesheet at least

    ours = urlsplit(live.url).netloc
    for url in re.findall(r"https?://[^\s\"'<>)]+", page.text):
        assert urlsplit(url).netloc == ours, url  # nothing from another host
    for url in parsed.urls:
        reply = requests.get(urljoin(page.url, url), timeout=30)
        assert reply.status_code == 200, url
        assert urlsplit(reply.url).netloc == ours, url
        assert len(reply.content) > 100, url
    kinds = {requests.get(urljoin(page.url, url), timeout=30).headers["Content-Type"] for url in assets}
    assert any("javascript" in kind for kind in kinds) and any(kind.startswith("text/css") for kind in kinds)
    # The schema as Swagger UI asks for it.
    reply = requests.get(urljoin(page.url, schema_urls[0]), headers={"Accept": "application/json,*/*"}, timeout=30)
    assert reply.status_code == 200 and reply.json()["openapi"].startswith("3.1")


def stream_events(reply) -> list:
    events = []
    for line in reply.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.parametrize(
    ("path", "body", "chunk"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "one two three"}]}, "ChatCompletionChunk"),
        ("/v1/completions", {"prompt": "one two three"}, "CompletionChunk"),
    ],
)
def test_every_event_of_a_stream_is_the_chunk_the_schema_names(live, key, path, body, chunk):
    schema = schema_of(live.get("/api/schema/", headers=OPENAPI_JSON))
    components = schema["components"]["schemas"]
    event = schema["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    json_data = event["properties"]["data"]["anyOf"][1]
    assert json_data["contentMediaType"] == "application/json"
    assert json_data["contentSchema"]["anyOf"][0] == {"$ref": f"#/components/schemas/{chunk}"}
    request = {**body, "model": "echo", "stream": True, "stream_options": {"include_usage": True}}
    reply = live.post(path, key, json=request, stream=True)
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
    events = stream_events(reply)
    assert events[-1] == "[DONE]" and len(events) >= 4  # role or text, tokens, finish, usage
    resolver = {"components": {"schemas": components}}
    for event in events[:-1]:
        jsonschema.validate(event, {**resolver, "$ref": f"#/components/schemas/{chunk}"})
    assert events[-2]["usage"]["completion_tokens"] >= 1


# -- schemathesis: the live server against its own schema ---------------------------

# Deployments of the test config that answer quickly and without fault. The others
# exist to fail (boom, missing-model, orphan), to be slow (sleeper, slow-stream) or
# are served by no worker here (smollm2): a 5xx from them is what they are for.
FAST_MODELS = ["echo", "words", "tiny-gpt2", "minilm", "seed-shaped", "counting", ""]
ACTIVE = ("queued", "running")
# Per operation, positive and negative cases together (~40 s for all here); a deeper
# run: DLA_SCHEMATHESIS_EXAMPLES=300 (about 4 min).
MAX_EXAMPLES = int(os.environ.get("DLA_SCHEMATHESIS_EXAMPLES", "60"))


def aimed_at_fast_models(schema: dict) -> dict:
    """The schema with every request body's `model` one of FAST_MODELS (in positive
    cases; negative ones still send anything else, which reads as an unknown model).
    The answers' schemas are left as they are."""
    for name in set(OPERATIONS.values()) - {None}:
        model = schema["components"]["schemas"][name]["properties"]["model"]
        model.pop("anyOf", None)
        model.update(type="string", enum=FAST_MODELS)
    return schema


@pytest.fixture(scope="module")
def live_schema(live):
    """The live server's schema, as schemathesis reads it (aimed at FAST_MODELS)."""
    raw = requests.get(live.url + "/api/schema/", headers=OPENAPI_JSON, timeout=30).json()
    config = schemathesis.Config.from_dict({"request-timeout": 30})
    return schemathesis.openapi.from_dict(aimed_at_fast_models(raw), config=config)


CHECKS = [
    not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
]
GENERATED = hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # nothing written under the checkout
    phases=[hypothesis.Phase.generate],  # the first failure as found: shrinking could take minutes
    suppress_health_check=list(hypothesis.HealthCheck),
    print_blob=True,
)


# HTTP's own headers: a malformed one is refused by the HTTP server (gunicorn, nginx)
# before the API sees the request, and a made-up Content-Length would hang it.
HTTP_FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "te", "trailer", "upgrade"}


def without_http_framing(case):
    if case.headers:
        case.headers = {name: value for name, value in case.headers.items() if name.lower() not in HTTP_FRAMING}
    return case


@pytest.mark.schemathesis
@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_the_live_server_keeps_the_promises_of_its_schema(live, live_schema, key, path, method):
    """Valid and invalid requests generated from the schema, sent over HTTP with a valid
    key: no 5xx, and every answer's status, content type, headers and body are the
    documented ones. A queued job is followed to its end through `GET /api/jobs/{id}/`,
    each state checked too (and the device's queue never fills up)."""
    auth = {"Authorization": f"Bearer {key}"}
    operation = live_schema[path][method.upper()]
    generated = st.one_of(*(operation.as_strategy(mode) for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)))
    sent = []

    def follow_job(job_id: str) -> None:
        poll = live_schema["/api/jobs/{job_id}/"]["GET"].Case(path_parameters={"job_id": job_id})
        deadline = time.monotonic() + 30
        while poll.call_and_validate(base_url=live.url, headers=auth, checks=CHECKS).json()["status"] in ACTIVE:
            assert time.monotonic() < deadline, f"job {job_id} never ended"
            time.sleep(0.05)

    @GENERATED
    @hypothesis.given(case=generated.map(without_http_framing))
    def conforms(case) -> None:
        started = time.monotonic()
        reply = case.call_and_validate(base_url=live.url, headers=auth, checks=CHECKS)
        sent.append(time.monotonic() - started)
        if reply.status_code == 202:
            follow_job(reply.json()["job_id"])

    conforms()
    assert sent, "no case was sent"
    assert max(sent) < 30


# -- the errors the schema documents, as the server really answers them ----------------

BODIES = {
    "RunBody": lambda model: {"text": "one two", "model": model},
    "ChatCompletionRequest": lambda model: {
        "model": model,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "one two"}],
    },
    "CompletionRequest": lambda model: {"model": model, "prompt": "one two", "max_tokens": 2},
    "EmbeddingsRequest": lambda model: {"model": model, "input": "one two"},
    "TokenizeRequest": lambda model: {"model": model, "prompt": "one two"},
}
TAKES_CALLS = [operation for operation, body in OPERATIONS.items() if body is not None]
GENERATES = [("/api/", "post"), ("/v1/chat/completions", "post"), ("/v1/completions", "post")]


def case_for(schema, path: str, method: str, model: str | None = None, **extra):
    """A request for the operation with fixed, valid arguments (`extra` added to its
    body), for `model` or a fast one that serves it."""
    operation = schema[path][method.upper()]
    model = model or ("minilm" if "embeddings" in path else "echo")
    if OPERATIONS[(path, method)] is not None:
        body = {**BODIES[OPERATIONS[(path, method)]](model), **extra}
        return operation.Case(body=body, media_type="application/json")
    if "{job_id}" in path:
        return operation.Case(path_parameters={"job_id": "6f1c1f64-5d0c-4b8e-9d5e-1d1d1d1d1d1d"})
    if "{model_id}" in path:
        return operation.Case(path_parameters={"model_id": model})
    return operation.Case()


def answered(case, url: str, key: str | None, status: int, code: str | None = None):
    """The case's answer, checked against the schema like a generated one (a 5xx
    expected here is one the schema documents)."""
    checks = CHECKS[1:] if status >= 500 else CHECKS
    reply = case.call_and_validate(
        base_url=url, headers={"Authorization": f"Bearer {key}"} if key else {}, checks=checks
    )
    assert reply.status_code == status, reply.text
    if code is not None:
        assert reply.json()["error"]["code"] == code, reply.text
    return reply


@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_every_key_refusal_is_a_documented_answer(live, live_schema, make_key, path, method):
    revoked, expired = make_key(), make_key(valid_until=timezone.now() - datetime.timedelta(days=1))
    ApiKey.objects.filter(prefix=revoked.split("_")[1]).update(revoked_at=timezone.now())
    case = case_for(live_schema, path, method)
    answered(case, live.url, None, 401, "missing_api_key")
    answered(case, live.url, "dla_nosuchkey000_" + "x" * 43, 401, "invalid_api_key")
    assert answered(case, live.url, revoked, 401, "key_revoked").headers["www-authenticate"] == ["Bearer"]
    answered(case, live.url, expired, 403, "key_expired")


@pytest.mark.parametrize(("path", "method"), TAKES_CALLS)
def test_every_refused_call_is_a_documented_answer(live, live_schema, make_key, path, method):
    answered(case_for(live_schema, path, method), live.url, make_key(max_calls=0), 429, "quota_exhausted")
    answered(
        case_for(live_schema, path, method), live.url, make_key(allowed_models=["words"]), 403, "model_not_allowed"
    )
    oversized = case_for(live_schema, path, method, padding="x" * (settings.LLM_CONFIG.server.max_body_bytes + 1))
    answered(oversized, live.url, make_key(), 413, "request_too_large")
    answered(case_for(live_schema, path, method, "no-such-model"), live.url, make_key(), 404, "model_not_found")


@pytest.mark.parametrize(("path", "method"), GENERATES)
@pytest.mark.parametrize(
    ("model", "status", "code"),
    [("boom", 500, "job_failed"), ("orphan", 503, "no_worker"), ("missing-model", 503, "model_unavailable")],
)
def test_every_server_side_failure_is_a_documented_answer(live, live_schema, key, path, method, model, status, code):
    reply = answered(case_for(live_schema, path, method, model), live.url, key, status, code)
    if code == "model_unavailable":
        assert reply.headers["retry-after"][0].isdigit()


def test_a_failure_after_the_stream_began_is_a_documented_event(live, live_schema, key):
    case = case_for(live_schema, "/v1/chat/completions", "post", "boom", stream=True)
    reply = answered(case, live.url, key, 200)
    assert '"code":"job_failed"' in reply.text


def test_a_job_past_its_deadline_is_a_documented_answer(live, live_schema, key):
    answered(case_for(live_schema, "/v1/completions", "post", "sleeper"), live.url, key, 504, "job_timeout")


UPSTREAM_CALLS = [
    ("/v1/chat/completions", "up-words", {}),
    ("/v1/chat/completions", "up-words", {"stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/completions", "up-tiny", {}),
    ("/v1/completions", "up-tiny", {"stream": True}),
    ("/v1/embeddings", "up-minilm", {}),
]


@pytest.fixture
def gateway_schema(gateway):
    raw = requests.get(gateway.url + "/api/schema/", headers=OPENAPI_JSON, timeout=30).json()
    return schemathesis.openapi.from_dict(raw)


@pytest.mark.parametrize(("path", "model", "extra"), UPSTREAM_CALLS)
def test_an_upstream_answer_is_a_documented_answer(gateway, gateway_schema, provider_key, key, path, model, extra):
    case = gateway_schema[path]["POST"].Case(body={**BODIES[OPERATIONS[(path, "post")]](model), **extra})
    answered(case, gateway.url, key, 200)


def test_upstream_models_and_failures_are_documented_answers(gateway, gateway_schema, provider_key, key):
    answered(gateway_schema["/v1/models"]["GET"].Case(), gateway.url, key, 200)
    card = gateway_schema["/v1/models/{model_id}"]["GET"].Case(path_parameters={"model_id": "up-words"})
    assert answered(card, gateway.url, key, 200).json()["owned_by"] == "provider"
    chat = gateway_schema["/v1/chat/completions"]["POST"]
    for model, status, code in [
        ("up-down", 502, "upstream_unreachable"),
        ("up-unset", 503, "upstream_not_configured"),
        ("up-badkey", 401, "invalid_api_key"),  # the provider's refusal of our secret
        ("up-sleepy", 504, "upstream_timeout"),
    ]:
        body = {**BODIES["ChatCompletionRequest"](model), "max_tokens": 30}  # up-sleepy: 100 ms a token
        answered(chat.Case(body=body), gateway.url, key, status, code)
