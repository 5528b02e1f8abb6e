"""One way in: every API view authenticates with the one class, which parses the
Authorization header once per request and verifies a JWT once (one signature check,
one subject lookup), whatever the endpoint and however the request ends; and when it
does so is as it always was (a call's key after the method, a read's key first)."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apikeys import authentication, jwt_auth
from apikeys.models import ApiKey
from tests.apikeys.test_jwt import make_token
from tests.helpers import error_of

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "words", "messages": [{"role": "user", "content": "hi"}]}
REQUESTS = [
    ("post", "/v1/chat/completions", {**CHAT, "model": "orphan"}, 503),  # admitted, then no worker
    ("post", "/v1/chat/completions", {**CHAT, "messages": "not a list"}, 400),  # a bad body checks the key
    ("post", "/v1/chat/completions", {**CHAT, "model": "no-such-model"}, 404),
    ("post", "/api/", {"text": "hi", "model": "orphan"}, 503),
    ("post", "/v1/tokenize", {"model": "orphan", "prompt": "hi"}, 503),
    ("get", "/v1/models", None, 200),
    ("get", "/v1/models/echo", None, 200),
    ("get", "/api/usage/", None, 200),
]


def counted(monkeypatch, module, name: str) -> list[str]:
    """Calls of `module.name`, which keeps working as before."""
    calls: list[str] = []
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def send(api, method: str, path: str, credentials: str, body):
    if method == "get":
        return api.get(path, credentials)
    return api.post(path, credentials, json=body)


@pytest.mark.parametrize("method, path, body, status", REQUESTS)
def test_a_jwt_is_verified_once_per_request(api, monkeypatch, method, path, body, status):
    token = make_token()
    send(api, "get", "/api/usage/", token, None)  # the subject's key exists from here on
    header_parses = counted(monkeypatch, authentication, "bearer_credentials")
    verifications = counted(monkeypatch, jwt_auth, "verified_claims")
    with CaptureQueriesContext(connection) as queries:
        response = send(api, method, path, token, body)
    assert response.status_code == status, response.content
    assert (len(header_parses), len(verifications)) == (1, 1)
    subject_lookups = [q["sql"] for q in queries.captured_queries if "jwt_subject" in q["sql"].split("WHERE")[-1]]
    assert len(subject_lookups) == 1, subject_lookups


@pytest.mark.parametrize("method, path, body, status", REQUESTS)
def test_a_key_is_parsed_once_per_request(api, make_key, monkeypatch, method, path, body, status):
    key = make_key()
    header_parses = counted(monkeypatch, authentication, "bearer_credentials")
    key_parses = counted(monkeypatch, authentication, "parse_key")
    assert send(api, method, path, key, body).status_code == status
    assert (len(header_parses), len(key_parses)) == (1, 1)


def test_the_request_log_names_the_caller_the_authentication_found(api, make_key, caplog):
    key = make_key()
    with caplog.at_level("INFO", logger="djangollmapi.requests"):
        send(api, "get", "/api/usage/", key, None)
        send(api, "get", "/api/usage/", make_token(), None)
        send(api, "get", "/api/usage/", "not-a-key", None)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "djangollmapi.requests"]
    labels = [line["key"] for line in lines]
    assert labels == [key.split("_")[1], "jwt", "-"]


CALL_ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/tokenize", "/api/", "/api/jobs/"]


@pytest.mark.parametrize("path", CALL_ENDPOINTS)
def test_an_endpoint_that_takes_calls_answers_a_wrong_method_before_the_key(api, path):
    reply = api.get(path)  # no key at all
    assert (reply.status_code, error_of(reply)["code"]) == (405, "method_not_allowed")
    assert api.client.options(path).status_code == 200


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/echo", "/api/usage/"])
@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS"])
def test_a_revoked_key_is_refused_by_a_reading_endpoint_whatever_the_method(api, make_key, path, method):
    key = make_key()
    ApiKey.objects.filter(prefix=key.split("_")[1]).update(revoked_at=timezone.now())
    reply = api.client.generic(method, path, **api.meta(key, None))
    assert (reply.status_code, error_of(reply)["code"]) == (401, "key_revoked")
