"""Key generation and verification, in one place.

A key reads `dla_<prefix>_<secret>`. The prefix (12 lowercase alphanumerics) finds the
row; only the SHA-256 of the secret is stored. The secret carries 256 bits from
`secrets`, so a fast hash is enough: nobody can brute-force it, unlike a password.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from typing import NamedTuple

KEY_SCHEME = "dla"
PREFIX_LENGTH = 12
PREFIX_ALPHABET = string.ascii_lowercase + string.digits
KEY_PATTERN = re.compile(r"^dla_([a-z0-9]{12})_([A-Za-z0-9_-]{32,128})$")


class PresentedKey(NamedTuple):
    """A key as a client sent it, split but not yet checked against the database."""

    prefix: str
    secret_hash: str


def generate_prefix() -> str:
    return "".join(secrets.choice(PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))


def generate_secret() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def format_key(prefix: str, secret: str) -> str:
    return f"{KEY_SCHEME}_{prefix}_{secret}"


class NewCredentials(NamedTuple):
    prefix: str
    secret_hash: str
    plaintext: str


def new_credentials() -> NewCredentials:
    """A fresh key. 36**12 prefixes make a collision negligible; the unique index on
    the prefix turns the impossible case into an error rather than a shared row."""
    prefix, secret = generate_prefix(), generate_secret()
    return NewCredentials(prefix, hash_secret(secret), format_key(prefix, secret))


def parse_key(key: str) -> PresentedKey | None:
    """Split a well-formed key; None for anything that cannot be one of ours."""
    match = KEY_PATTERN.match(key)
    if not match:
        return None
    prefix, secret = match.groups()
    return PresentedKey(prefix, hash_secret(secret))


def hashes_match(stored_hash: str, presented_hash: str) -> bool:
    return hmac.compare_digest(stored_hash.encode(), presented_hash.encode())
