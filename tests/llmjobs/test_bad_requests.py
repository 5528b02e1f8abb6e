"""Every malformed request gets a clear 4xx in the OpenAI shape and costs no call.
What is decided before a job is queued is tested in-process (`api`)."""

import pytest

from tests.helpers import error_of, key_row

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({}, "missing_text", "text"),
        ({"text": 12}, "invalid_text", "text"),
        ({"text": None}, "missing_text", "text"),
        ({"text": "x" * 2001}, "text_too_long", "text"),
        ({"text": "hi", "model": 5}, "invalid_model", "model"),
        (["text"], "invalid_body", None),
    ],
)
def test_invalid_body_is_400(api, key, body, code, param):
    response = api.post("/api/", key, json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert key_row(key).calls_used == 0


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("[" * 20_000 + "]" * 20_000, "application/json"),
        ('{"text": "hi"}', "application/json; charset=rot13"),
        ('{"text": "hi"}', "application/json; charset=zlib"),
        (b'{"text": "\xff\xfe"}', "application/json"),
    ],
)
def test_unreadable_bodies_are_400(api, key, body, content_type):
    response = api.post("/api/", key, data=body, headers={"Content-Type": content_type})
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "invalid_json"
    assert key_row(key).calls_used == 0


@pytest.mark.parametrize("raw_text", ["a\\u0000b", "a\\ud800b"])
def test_text_no_database_can_store_is_400(api, key, raw_text):
    body = '{"text": "' + raw_text + '", "model": "echo"}'
    response = api.post("/api/", key, data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "invalid_text"
    assert key_row(key).calls_used == 0


def test_non_json_is_400(api, key):
    response = api.post("/api/", key, data="text=hello", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"
    assert key_row(key).calls_used == 0


def test_body_over_limit_is_413(api, key):
    response = api.post("/api/", key, json={"text": "x" * 70_000})
    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"
    assert key_row(key).calls_used == 0


def test_chunked_body_is_411(live, key):
    chunks = iter([b'{"text": ', b'"hi"}'])
    response = live.post("/api/", key, data=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 411
    assert error_of(response)["code"] == "length_required"
    assert key_row(key).calls_used == 0


def test_unknown_model_is_404(api, key):
    response = api.post("/api/", key, json={"text": "hi", "model": "gpt-9"})
    assert response.status_code == 404
    error = error_of(response)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert key_row(key).calls_used == 0


def test_key_errors_win_over_body_errors(api):
    response = api.post("/api/", "dla_aaaaaaaaaaaa_" + "b" * 43, json={"nope": 1})
    assert response.status_code == 401


def test_model_outside_the_keys_list_is_403_and_free(live, make_key):
    key = make_key(allowed_models=["echo"])
    assert live.post("/api/", key, json={"text": "hi", "model": "echo"}).status_code == 200
    response = live.post("/api/", key, json={"text": "hi", "model": "tiny-gpt2"})
    assert response.status_code == 403
    assert error_of(response)["code"] == "model_not_allowed"
    assert key_row(key).calls_used == 1


def test_get_on_a_post_endpoint_is_405_json(api, key):
    response = api.get("/api/", key)
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"


def test_unknown_path_is_404_json(api):
    response = api.get("/api/nothing-here/")
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


def test_disallowed_host_is_400_json(api, key):
    response = api.post("/api/", key, json={"text": "hi"}, headers={"Host": "evil.example"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "bad_request"
