"""Secrets never logged: the secrets the suite knows, and the scan that finds them.

The session (tests/conftest.py) remembers every secret it can know: each API key's
secret as it is made (`remember_issued_keys`), the upstream secrets of the test
gateway, the test SECRET_KEY, the metrics token and the lines of the TEST-ONLY JWT
private key (`remember_test_secrets`). It keeps every in-process log record
(`KeptLogRecords` on the root logger) and notes how far each file in the test data
dir's logs/ already went (`log_offsets`). At the end it scans what the servers wrote
since and what was logged in-process (`scan_session`), and fails the session on
any find. `tests.helpers.error_of` scans each error body it parses the same way.

Besides the known secrets, two shapes are never allowed whoever made them: a whole
API key (`dla_<prefix>_<secret>`, e.g. a key made in a server process, or a bad key
a client sent) and a whole bearer JWT. A key's prefix alone may be logged (the
request log names keys by it); its secret may not. Finds show a few characters of
what leaked, never all of it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Characters secrets are made of: URL-safe base64 (keys, SECRET_KEY), standard base64
# (PEM lines) and the dashes of hand-written tokens. A secret is found as (part of) a
# run of these, so the scan looks up runs in a table instead of every secret in every line.
SECRET_CHARACTERS = re.compile(r"[A-Za-z0-9_+/=-]+")
SHORTEST_SECRET = 16  # anything shorter would match ordinary words
WHOLE_KEY = re.compile(r"dla_[a-z0-9]{12}_[A-Za-z0-9_-]{32,}")
WHOLE_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")
PRIVATE_KEY_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def redacted(secret: str) -> str:
    """Enough of a secret to recognise it, never enough to use it."""
    return f"{secret[:4]}... ({len(secret)} chars)"


class Secrets:
    """Known secrets, each with what it is (`add`), and which of them occur in a text
    (`find`)."""

    def __init__(self) -> None:
        self._by_length: dict[int, dict[str, str]] = {}
        self._odd: dict[str, str] = {}  # with characters outside SECRET_CHARACTERS

    def __len__(self) -> int:
        return sum(map(len, self._by_length.values())) + len(self._odd)

    def __contains__(self, secret: str) -> bool:
        return secret in self._by_length.get(len(secret), {}) or secret in self._odd

    def add(self, secret: str, what: str) -> None:
        if len(secret) < SHORTEST_SECRET:
            raise ValueError(f"{what} is too short to scan for ({len(secret)} chars)")
        if SECRET_CHARACTERS.fullmatch(secret):
            self._by_length.setdefault(len(secret), {})[secret] = what
        else:
            self._odd[secret] = what

    def add_key(self, plaintext: str, what: str = "an API key's secret") -> None:
        """A key `dla_<prefix>_<secret>`: its secret is what must not leak."""
        self.add(plaintext.split("_", 2)[2], what)

    def find(self, text: str) -> list[str]:
        """What leaked in `text`, each as 'what (redacted)'; empty when nothing did. A
        known secret inside a whole key is reported once, as the whole key."""
        keys = list(WHOLE_KEY.finditer(text))
        found = [f"a whole API key (dla_{key.group()[4:16]}_{redacted(key.group()[17:])})" for key in keys]
        found += [f"a whole bearer JWT ({redacted(jwt.group())})" for jwt in WHOLE_JWT.finditer(text)]
        found += ["a PEM private key" for _ in PRIVATE_KEY_PEM.finditer(text)]
        for run in SECRET_CHARACTERS.finditer(text):
            token = run.group()
            for length, table in self._by_length.items():
                for start in range(len(token) - length + 1):
                    what = table.get(token[start : start + length])
                    at = run.start() + start
                    if what and not any(key.start() <= at < key.end() for key in keys):
                        found.append(f"{what} ({redacted(token[start : start + length])})")
        found += [f"{what} ({redacted(secret)})" for secret, what in self._odd.items() if secret in text]
        return found


KNOWN = Secrets()  # this session's


@dataclass(frozen=True)
class Leak:
    source: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.what}"


def scan_lines(lines: Iterable[str], source: str, first_line: int = 1, secrets: Secrets = KNOWN) -> list[Leak]:
    return [Leak(source, number, what) for number, line in enumerate(lines, first_line) for what in secrets.find(line)]


def session_part(path: Path, offset: int) -> tuple[int, str]:
    """The text of `path` from byte `offset` on (all of it if the file is now shorter,
    as after a rotation), and the number of its first line in the file."""
    data = path.read_bytes()
    if offset > len(data):
        offset = 0
    return data[:offset].count(b"\n") + 1, data[offset:].decode(errors="replace")


def scan_file(path: Path, offset: int = 0, secrets: Secrets = KNOWN) -> list[Leak]:
    first_line, text = session_part(path, offset)
    return scan_lines(text.splitlines(), str(path), first_line, secrets)


def log_offsets(directory: Path) -> dict[Path, int]:
    """How far each log file already went, so the scan reads only this session's part."""
    return {path: path.stat().st_size for path in sorted(directory.rglob("*")) if path.is_file()}


class KeptLogRecords(logging.Handler):
    """Every record the test process logs, formatted as the servers' log files have
    them (djangollmapi.settings LOGGING), with the test that was running."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        self.records: list[tuple[str, str]] = []  # (test node id, formatted text)
        self.current_test = "(no test)"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((self.current_test, self.format(record)))
        except Exception:
            self.handleError(record)

    def scan(self, secrets: Secrets = KNOWN) -> list[Leak]:
        return [
            Leak(f"in-process log record {number} (during {test})", line_number, what)
            for number, (test, text) in enumerate(self.records, 1)
            for line_number, line in enumerate(text.splitlines(), 1)
            for what in secrets.find(line)
        ]


def remember_issued_keys(secrets: Secrets = KNOWN) -> None:
    """Remember every key made in this process from now on, wherever it is made
    (`ApiKey.objects.issue`, the admin's add form, createapikey): all of them take
    their plaintext from `apikeys.keys.new_credentials`."""
    from apikeys import keys

    made = keys.new_credentials

    def new_credentials_remembered() -> keys.NewCredentials:
        credentials = made()
        secrets.add_key(credentials.plaintext)
        return credentials

    keys.new_credentials = new_credentials_remembered


def remember_test_secrets(django_settings, upstream_secrets: dict[str, str], secrets: Secrets = KNOWN) -> None:
    """The secrets the test config and fixtures hold."""
    secrets.add(django_settings.SECRET_KEY, "the test SECRET_KEY")
    for what, key in upstream_secrets.items():
        secrets.add_key(key, what)
    if django_settings.LLM_CONFIG.metrics.token:
        secrets.add(django_settings.LLM_CONFIG.metrics.token, "the metrics token")
    pem = Path(__file__).resolve().parent / "fixtures" / "jwt-test-private.pem"
    for line in pem.read_text().splitlines():
        if not line.startswith("-----") and len(line) >= 32:  # the body's lines, not the short last one
            secrets.add(line, "a line of the JWT test private key")


def assert_no_secret(text: str, where: str) -> None:
    """For response bodies: fail at once, naming what leaked but not showing it."""
    found = KNOWN.find(text)
    assert not found, f"{where} holds " + "; ".join(found)


@dataclass
class SessionScan:
    leaks: list[Leak]
    files: int
    lines: int
    records: int

    def summary(self, secrets: Secrets = KNOWN) -> str:
        return (
            f"{len(secrets)} secrets looked for in {self.lines} lines of {self.files} log files "
            f"and {self.records} in-process log records"
        )


def scan_session(offsets: dict[Path, int], directory: Path, kept: KeptLogRecords) -> SessionScan:
    """This session's part of every log file in `directory`, and the in-process log."""
    files = [path for path in sorted(directory.rglob("*")) if path.is_file()]
    found, line_count = [], 0
    for path in files:
        first_line, text = session_part(path, offsets.get(path, 0))
        lines = text.splitlines()
        line_count += len(lines)
        found += scan_lines(lines, str(path), first_line)
    return SessionScan(found + kept.scan(), len(files), line_count, len(kept.records))
