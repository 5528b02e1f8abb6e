"""The secrets scan itself (tests/leaks.py): a planted secret is found, with its file
and line but not in full, so the session's final check cannot pass by finding
nothing; and the session really remembers its keys and keeps its log records."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from django.conf import settings

from apikeys.models import ApiKey
from tests import conftest, leaks
from tests.helpers import error_of

PLANTED_KEY = "dla_plantedkey01_" + "Zq3v" * 10 + "Abc"  # 43 characters, as issued keys have


@pytest.fixture
def planted() -> leaks.Secrets:
    """A registry of its own, so nothing planted here reaches the session's."""
    secrets = leaks.Secrets()
    secrets.add_key(PLANTED_KEY)
    secrets.add("a-hand-written-token", "a token")
    return secrets


def test_a_secret_planted_in_a_log_is_found_by_file_and_line(tmp_path, planted):
    log = tmp_path / "web.log"
    secret = PLANTED_KEY.split("_", 2)[2]
    log.write_text(
        "INFO key plantedkey01 called /v1/models\n"  # the prefix alone may be logged
        f'WARNING upstream said {{"detail": "bad key {secret}"}}\n'
        "INFO all quiet\n"
        "ERROR Authorization: Bearer a-hand-written-token\n"
    )
    found = leaks.scan_file(log, secrets=planted)
    assert [(leak.source, leak.line) for leak in found] == [(str(log), 2), (str(log), 4)]
    assert "an API key's secret" in found[0].what and "a token" in found[1].what
    assert all(secret not in str(leak) and "a-hand-written-token" not in str(leak) for leak in found)


def test_only_the_sessions_part_of_a_log_is_scanned_and_lines_keep_their_numbers(tmp_path, planted):
    log = tmp_path / "worker.log"
    log.write_text(f"an earlier run leaked {PLANTED_KEY}\n")
    offsets = leaks.log_offsets(tmp_path)
    with log.open("a") as fh:
        fh.write("this run: fine\n" + f"this run: {PLANTED_KEY}\n")
    found = leaks.scan_file(log, offsets[log], planted)
    assert [leak.line for leak in found] == [3]
    assert found[0].what.startswith("a whole API key (dla_plantedkey01_Zq3v...")  # reported once, as the key


def test_whole_keys_jwts_and_private_keys_are_found_whoever_made_them():
    nobody = leaks.Secrets()  # a key made in a server process is known to no registry here
    text = (
        "dla_abcdefghijkl_" + "k" * 43 + " eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9." + "s" * 40 + "\n"
        "-----BEGIN RSA PRIVATE KEY-----"
    )
    found = nobody.find(text)
    assert [what.split(" (")[0] for what in found] == ["a whole API key", "a whole bearer JWT", "a PEM private key"]
    assert nobody.find("dla_abcdefghijkl called; job eyJ-not-a-token; dla_http_requests_total") == []


def test_kept_log_records_are_scanned_with_the_test_that_logged_them(planted):
    kept = leaks.KeptLogRecords()
    kept.current_test = "tests/test_x.py::test_y"
    logger = logging.getLogger("tests.leaks.planted")
    logger.propagate = False  # the session's own capture must not see the planted secret
    logger.addHandler(kept)
    try:
        logger.error("upstream refused", exc_info=ValueError(f"bad key {PLANTED_KEY}"))
    finally:
        logger.removeHandler(kept)
    found = kept.scan(planted)
    assert [leak.source for leak in found] == ["in-process log record 1 (during tests/test_x.py::test_y)"]
    assert found[0].line > 1  # in the traceback, below the message


def test_the_session_remembers_the_keys_it_makes_and_the_config_secrets(make_key):
    plaintext = make_key()
    _, direct = ApiKey.objects.issue(name="direct")
    assert plaintext.split("_", 2)[2] in leaks.KNOWN and direct.split("_", 2)[2] in leaks.KNOWN
    assert settings.SECRET_KEY in leaks.KNOWN
    assert conftest.PROVIDER_SECRET.split("_", 2)[2] in leaks.KNOWN
    assert settings.LLM_CONFIG.metrics.token in leaks.KNOWN


def test_the_session_keeps_every_in_process_log_record(request):
    assert conftest.KEPT_LOGS in logging.getLogger().handlers
    logging.getLogger("djangollmapi.test").warning("a line the session keeps")
    test, text = conftest.KEPT_LOGS.records[-1]
    assert test == request.node.nodeid and text.endswith("WARNING djangollmapi.test a line the session keeps")


def test_error_of_fails_on_an_error_body_holding_a_secret(make_key):
    plaintext = make_key()
    body = f'{{"error": {{"message": "bad key {plaintext}", "type": "x", "code": "y", "param": null}}}}'
    response = SimpleNamespace(content=body.encode(), json=lambda: None)
    with pytest.raises(AssertionError, match="the error body holds a whole API key") as failed:
        error_of(response)
    assert plaintext.split("_", 2)[2] not in str(failed.value)
