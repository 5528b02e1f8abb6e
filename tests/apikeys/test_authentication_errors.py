"""Each way a key can be refused: the status, the code, the Bearer challenge."""

from datetime import timedelta

import pytest
from django.utils import timezone

from apikeys.models import ApiKey
from tests.helpers import error_of, key_row

pytestmark = pytest.mark.django_db(transaction=True)

BODY = {"text": "hi", "model": "echo"}


def assert_401(response, code):
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error = error_of(response)
    assert (error["code"], error["type"]) == (code, "authentication_error")


def test_no_header(live):
    assert_401(live.post("/api/", json=BODY), "missing_api_key")


def test_bearer_with_no_key(live):
    assert_401(live.post("/api/", json=BODY, headers={"Authorization": "Bearer "}), "missing_api_key")


def test_other_scheme(live):
    assert_401(live.post("/api/", json=BODY, headers={"Authorization": "Token x"}), "invalid_authorization_header")


def test_malformed_key(live):
    assert_401(live.post("/api/", "not-a-key", json=BODY), "invalid_api_key")


def test_unknown_key(live, key):
    prefix = key.split("_")[1]
    assert_401(live.post("/api/", f"dla_{prefix}_{'x' * 43}", json=BODY), "invalid_api_key")
    assert_401(live.post("/api/", "dla_zzzzzzzzzzzz_" + "y" * 43, json=BODY), "invalid_api_key")
    assert key_row(key).calls_used == 0


def test_revoked_key(live, key):
    ApiKey.objects.filter(id=key_row(key).id).update(revoked_at=timezone.now())
    assert_401(live.post("/api/", key, json=BODY), "key_revoked")


def test_before_window(live, make_key):
    key = make_key(valid_from=timezone.now() + timedelta(days=1))
    response = live.post("/api/", key, json=BODY)
    assert response.status_code == 403
    assert error_of(response)["code"] == "key_not_yet_valid"
    assert key_row(key).calls_used == 0


def test_after_window(live, make_key):
    key = make_key(valid_until=timezone.now() - timedelta(seconds=1))
    response = live.post("/api/", key, json=BODY)
    assert response.status_code == 403
    assert error_of(response)["code"] == "key_expired"


def test_inside_window(live, make_key):
    now = timezone.now()
    key = make_key(valid_from=now - timedelta(hours=1), valid_until=now + timedelta(hours=1))
    assert live.post("/api/", key, json=BODY).status_code == 200


def test_zero_quota_means_no_calls(live, make_key):
    key = make_key(max_calls=0)
    response = live.post("/api/", key, json=BODY)
    assert response.status_code == 429
    error = error_of(response)
    assert (error["code"], error["type"]) == ("quota_exhausted", "rate_limit_error")
    assert key_row(key).calls_used == 0


def test_quota_counts_down_then_429(live, make_key):
    key = make_key(max_calls=2)
    assert [live.post("/api/", key, json=BODY).status_code for _ in range(3)] == [200, 200, 429]
    assert key_row(key).calls_used == 2


def test_used_up_key_may_still_read_its_usage(live, make_key):
    key = make_key(max_calls=0)
    response = live.get("/api/usage/", key)
    assert response.status_code == 200
    assert response.json()["key"]["calls_left"] == 0
