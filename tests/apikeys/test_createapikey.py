"""`manage.py createapikey`: prints the key once, stores only its hash."""

from datetime import UTC, datetime
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apikeys.keys import hash_secret
from apikeys.models import ApiKey

pytestmark = pytest.mark.django_db


def create(*args):
    out = StringIO()
    call_command("createapikey", *args, stdout=out)
    return out.getvalue()


def test_prints_the_key_once_and_stores_only_the_hash():
    output = create(
        "--name",
        "alice",
        "--max-calls",
        "10",
        "--models",
        "echo, tiny-gpt2",
        "--valid-from",
        "2026-01-01",
        "--valid-until",
        "2027-01-01T12:00:00+00:00",
    )
    plaintext = output.strip().splitlines()[-1]
    api_key = ApiKey.objects.get()
    secret = plaintext.split("_", 2)[2]
    assert api_key.secret_hash == hash_secret(secret)
    assert secret not in str(ApiKey.objects.values().get())
    assert (api_key.name, api_key.max_calls, api_key.allowed_models) == ("alice", 10, ["echo", "tiny-gpt2"])
    assert api_key.valid_from == datetime(2026, 1, 1, tzinfo=UTC)
    assert api_key.valid_until == datetime(2027, 1, 1, 12, tzinfo=UTC)


def test_quiet_prints_only_the_key():
    output = create("--name", "bob", "--quiet")
    assert output.strip().startswith("dla_") and len(output.strip().splitlines()) == 1
    assert ApiKey.objects.get().max_calls is None


def test_sets_a_token_budget():
    create("--name", "budget", "--max-tokens", "50000", "--quiet")
    assert (ApiKey.objects.get().max_tokens_total, ApiKey.objects.get().tokens_used) == (50000, 0)


def test_zero_max_calls_is_zero_not_unlimited():
    create("--name", "zero", "--max-calls", "0", "--quiet")
    assert ApiKey.objects.get().max_calls == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-calls", "-1"], "--max-calls must be 0 or more"),
        (["--max-tokens", "-5"], "--max-tokens must be 0 or more"),
        (["--valid-from", "2027-01-01", "--valid-until", "2026-01-01"], "--valid-until must be after"),
        (["--valid-until", "next tuesday"], "not an ISO 8601"),
    ],
)
def test_bad_arguments_are_refused(args, message):
    with pytest.raises((CommandError, SystemExit)) as caught:
        call_command("createapikey", "--name", "x", *args, stdout=StringIO(), stderr=StringIO())
    if isinstance(caught.value, CommandError):
        assert message in str(caught.value)
    assert not ApiKey.objects.exists()
