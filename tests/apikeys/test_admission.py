"""Admission takes a call inside the transaction that records its job: a refusal,
a forbidden model included, rolls the taking back, so it costs nothing and needs no
refund."""

from __future__ import annotations

import pytest
from django.db import transaction

from apikeys.keys import parse_key
from apikeys.models import ApiKey
from apikeys.services import take_call
from djangollmapi.errors import ApiError

pytestmark = pytest.mark.django_db(transaction=True)


def issued(**fields) -> tuple[ApiKey, str]:
    return ApiKey.objects.issue(name="admission", **fields)


def test_a_call_is_taken_with_its_reservation():
    api_key, plaintext = issued(max_calls=2, max_tokens_total=100)
    with transaction.atomic():
        assert take_call(parse_key(plaintext), "echo", reserve_tokens=30).key_id == api_key.id
    api_key.refresh_from_db()
    assert (api_key.calls_used, api_key.tokens_used) == (1, 30)


def test_a_forbidden_model_rolls_the_call_back():
    api_key, plaintext = issued(max_calls=2, max_tokens_total=100, allowed_models=["echo"])
    with pytest.raises(ApiError) as caught, transaction.atomic():
        take_call(parse_key(plaintext), "tiny-gpt2", reserve_tokens=30)
    assert (caught.value.status, caught.value.code) == (403, "model_not_allowed")
    api_key.refresh_from_db()
    assert (api_key.calls_used, api_key.tokens_used) == (0, 0)


def test_admission_outside_the_jobs_transaction_is_a_programming_error():
    _api_key, plaintext = issued()
    with pytest.raises(RuntimeError, match="inside the transaction"):
        take_call(parse_key(plaintext), "echo")
