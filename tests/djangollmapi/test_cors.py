"""CORS ([cors]): browsers on an allowed origin may call the API, with the headers the
OpenAI JS SDK sends; other origins and the admin get no CORS headers at all."""

import pytest
import requests

from tests.helpers import error_of

pytestmark = pytest.mark.django_db(transaction=True)

ALLOWED, EVIL = "https://allowed.example", "https://evil.example"
CHAT = {"model": "words", "messages": [{"role": "user", "content": "hello"}]}
SDK_HEADERS = "authorization,content-type,x-stainless-os"


def preflight(live, path: str, origin: str, headers: str = SDK_HEADERS) -> requests.Response:
    request_headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    request_headers["Access-Control-Request-Headers"] = headers
    return requests.options(live.url + path, headers=request_headers, timeout=10)


def header_list(response: requests.Response, name: str) -> set[str]:
    return {item.strip().lower() for item in response.headers.get(name, "").split(",") if item.strip()}


def test_preflight_from_an_allowed_origin(live):
    response = preflight(live, "/v1/chat/completions", ALLOWED)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "post" in header_list(response, "Access-Control-Allow-Methods")
    allowed = header_list(response, "Access-Control-Allow-Headers")
    assert {"authorization", "content-type", "x-stainless-os", "x-stainless-retry-count", "openai-project"} <= allowed
    assert response.headers["Access-Control-Max-Age"] == "600"
    assert "Access-Control-Allow-Credentials" not in response.headers


def test_preflight_from_another_origin_gets_no_allow_origin(live):
    response = preflight(live, "/v1/chat/completions", EVIL)
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Headers" not in response.headers


def test_a_call_from_an_allowed_origin_exposes_the_request_id(live, key):
    response = live.post("/v1/chat/completions", key, json=CHAT, headers={"Origin": ALLOWED})
    assert response.status_code == 200, response.text
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert {"x-request-id", "x-upstream-request-id", "retry-after"} <= header_list(
        response, "Access-Control-Expose-Headers"
    )
    assert response.headers["X-Request-Id"]


def test_seed_endpoint_from_an_allowed_origin(live, key):
    response = live.post("/api/", key, json={"text": "hi", "model": "echo"}, headers={"Origin": ALLOWED})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED


def test_an_error_from_an_allowed_origin_is_readable_by_the_page(live):
    response = live.post("/v1/chat/completions", json=CHAT, headers={"Origin": ALLOWED})
    assert response.status_code == 401
    assert error_of(response)["code"] == "missing_api_key"
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED


def test_an_error_from_our_middleware_carries_cors_too(live, key):
    response = live.post("/api/", key, data=b"x" * 70_000, headers={"Origin": ALLOWED})
    assert response.status_code == 413
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED


def test_a_call_from_another_origin_gets_no_allow_origin(live, key):
    response = live.post("/v1/chat/completions", key, json=CHAT, headers={"Origin": EVIL})
    assert response.status_code == 200  # CORS is the browser's check; the server just says nothing
    assert "Access-Control-Allow-Origin" not in response.headers


def test_the_admin_gets_no_cors_headers(live):
    response = requests.get(live.url + "/admin/login/", headers={"Origin": ALLOWED}, timeout=10)
    assert response.status_code == 200
    assert not [name for name in response.headers if name.lower().startswith("access-control-")]
    response = preflight(live, "/admin/login/", ALLOWED)
    assert "Access-Control-Allow-Origin" not in response.headers


def test_a_stream_from_an_allowed_origin_carries_cors(live, key):
    response = live.post("/v1/chat/completions", key, json={**CHAT, "stream": True}, headers={"Origin": ALLOWED})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert response.text.rstrip().endswith("data: [DONE]")
