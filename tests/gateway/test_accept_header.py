"""Whatever `Accept` a client sends, the API answers (JSON, or the event stream it
asked for): SSE clients send `Accept: text/event-stream`, browsers `text/html`, and
DRF used to refuse both with a 406 before the view ran (found by schemathesis)."""

from __future__ import annotations

import pytest

from tests.helpers import error_of

pytestmark = pytest.mark.django_db(transaction=True)

ODD_ACCEPTS = ["text/event-stream", "text/html", "application/xml", "garbage;;", "*/*"]


@pytest.mark.parametrize("accept", ODD_ACCEPTS)
def test_any_accept_header_gets_the_json_answer(api, key, accept):
    models = api.get("/v1/models", key, headers={"Accept": accept})
    assert models.status_code == 200 and models["Content-Type"] == "application/json"
    assert models.json()["object"] == "list"
    usage = api.get("/api/usage/", key, headers={"Accept": accept})
    assert usage.status_code == 200 and "key" in usage.json()
    missing = api.post("/v1/chat/completions", key, json={"model": "echo", "messages": []}, headers={"Accept": accept})
    assert missing.status_code == 400 and error_of(missing)["param"] == "messages"


def test_an_sse_client_that_accepts_only_event_streams_gets_its_stream(live, key):
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "one two"}]}
    reply = live.post("/v1/chat/completions", key, json=body, headers={"Accept": "text/event-stream"}, stream=True)
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
    assert reply.text.rstrip().endswith("data: [DONE]")


def test_an_unauthorized_caller_is_still_told_so_whatever_it_accepts(api):
    reply = api.get("/v1/models", headers={"Accept": "text/html"})
    assert reply.status_code == 401 and error_of(reply)["code"] == "missing_api_key"
