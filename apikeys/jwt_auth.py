"""Bearer JWTs from an identity provider, as an alternative to our API keys ([jwt]).

A verified token's `sub` names an ApiKey row (`jwt_subject`), and the caller gets that
row's PresentedKey back, so consume_call, quotas, date windows, revocation, token
budgets and usage apply exactly as for a key typed by hand. Nothing per token or per
subject is cached: every request verifies the token and reads the row again, and the
consume SQL re-checks revocation, so revoking the key stops the subject at once.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import jwt
from django.db import IntegrityError, transaction

from apikeys import selectors
from apikeys.keys import PresentedKey
from apikeys.models import ApiKey
from djangollmapi.config import JwtConfig
from djangollmapi.errors import ApiError

log = logging.getLogger(__name__)

# header.payload.signature in base64url. The signature may be empty so that an unsigned
# (`alg: none`) token is refused as a token, not as a malformed key. Keys never hold a dot.
JWT_PATTERN = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
REQUIRED_CLAIMS = ["exp", "iss", "aud", "sub"]
# A JWKS fetch holds up every request that needs it; a provider slower than this is down.
JWKS_FETCH_TIMEOUT_S = 5.0
SUBJECT_MAX_LENGTH = ApiKey._meta.get_field("jwt_subject").max_length
NAME_MAX_LENGTH = ApiKey._meta.get_field("name").max_length


def looks_like_jwt(credentials: str) -> bool:
    """Three base64url segments: cheap to tell apart from `dla_<prefix>_<secret>`."""
    return JWT_PATTERN.match(credentials) is not None


def presented_jwt(token: str, config: JwtConfig) -> PresentedKey:
    """The key a valid token stands for, or the ApiError that says why not (401 for the
    token's faults, 503 when the provider's keys cannot be read)."""
    claims = verified_claims(token, config)
    api_key = key_for_subject(claims["sub"], config)
    return PresentedKey(api_key.prefix, api_key.secret_hash)


def verified_claims(token: str, config: JwtConfig) -> dict[str, Any]:
    """The claims of a token signed by one of the provider's keys with an algorithm the
    config allows, unexpired, from the issuer, for our audience. Messages never repeat
    the token or its claims: they may be someone else's."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:
        raise invalid_token("The bearer token is malformed.") from exc
    key = signing_key(header, config)
    if key is None:
        raise invalid_token("The bearer token is signed with an unknown key.")
    try:
        claims = jwt.decode(
            token,
            key,
            # The PyJWK also pins the one algorithm of its key, so a token cannot pick
            # HS256 and have the public key used as an HMAC secret.
            algorithms=list(config.algorithms),
            audience=config.audience,
            issuer=config.issuer,
            leeway=config.leeway_s,
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.ExpiredSignatureError as exc:
        raise selectors.unauthorized("token_expired", "The bearer token has expired.") from exc
    except jwt.InvalidIssuerError as exc:
        raise selectors.unauthorized("invalid_issuer", "The bearer token is from another issuer.") from exc
    except jwt.InvalidAudienceError as exc:
        raise selectors.unauthorized("invalid_audience", "The bearer token is meant for another audience.") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise invalid_token(f"The bearer token lacks the {exc.claim!r} claim.") from exc
    except jwt.InvalidAlgorithmError as exc:
        raise invalid_token("The bearer token's algorithm is not accepted.") from exc
    except jwt.PyJWTError as exc:
        raise invalid_token("The bearer token is not valid.") from exc
    if not 0 < len(claims["sub"]) <= SUBJECT_MAX_LENGTH:
        raise invalid_token(f"The bearer token's subject must be 1 to {SUBJECT_MAX_LENGTH} characters.")
    return claims


def invalid_token(message: str) -> ApiError:
    return selectors.unauthorized("invalid_token", message)


def signing_key(header: dict[str, Any], config: JwtConfig) -> jwt.PyJWK | None:
    """The key named by the token's `kid`; with no `kid`, the JWKS's only key. An
    unknown `kid` on a JWKS URL may be a key the provider just rotated in, so the set
    is fetched again, at most once per PyJWKClient cooldown: random kids cannot make
    us hammer the provider."""
    kid = header.get("kid")
    key = select_key(jwks_keys(config), kid)
    if key is None and kid is not None and config.jwks_url:
        try:
            key = jwks_client(config.jwks_url).get_signing_key(kid)
        except (jwt.PyJWKClientConnectionError, jwt.PyJWKSetError, ValueError) as exc:
            raise jwks_unavailable(config.jwks_url, exc) from exc
        except jwt.PyJWKClientError:
            return None
    return key


def select_key(keys: list[jwt.PyJWK], kid: str | None) -> jwt.PyJWK | None:
    if kid is None:
        return keys[0] if len(keys) == 1 else None
    return next((key for key in keys if key.key_id == kid), None)


def jwks_keys(config: JwtConfig) -> list[jwt.PyJWK]:
    """The provider's signing keys, or a logged 503: an outage at the provider is not
    the client's fault, and not a crash of ours either."""
    try:
        if config.jwks_url:
            return jwks_client(config.jwks_url).get_signing_keys()
        return list(jwks_file_keys(config.jwks_file))
    except (OSError, ValueError, jwt.PyJWTError) as exc:
        raise jwks_unavailable(config.jwks_url or config.jwks_file, exc) from exc


@functools.cache
def jwks_file_keys(path: str) -> tuple[jwt.PyJWK, ...]:
    """The signing keys in a JWKS file, read once per process (a failure is not cached,
    so a fixed file is picked up by the next request). Restart to rotate keys."""
    jwk_set = jwt.PyJWKSet.from_json(Path(path).read_text())
    keys = tuple(key for key in jwk_set.keys if key.public_key_use in (None, "sig"))
    if not keys:
        raise jwt.PyJWKSetError("The JWK Set holds no signing keys")
    return keys


@functools.cache
def jwks_client(url: str) -> jwt.PyJWKClient:
    """One client per process: it caches the key set (5 minutes) for every thread."""
    return jwt.PyJWKClient(url, timeout=JWKS_FETCH_TIMEOUT_S)


def jwks_unavailable(source: str, exc: Exception) -> ApiError:
    log.error("JWKS %s unavailable: %s: %s", source, type(exc).__name__, exc)
    return ApiError(503, "jwks_unavailable", "The identity provider's signing keys cannot be read; retry later.")


def key_for_subject(subject: str, config: JwtConfig) -> ApiKey:
    """The key linked to `subject` (by an admin, or created on its first use when
    `create_keys` is on). Revoked, expired or used-up keys are returned too: the
    consume that follows reports those precisely."""
    api_key = ApiKey.objects.filter(jwt_subject=subject).first()
    if api_key is not None:
        return api_key
    if not config.create_keys:
        raise selectors.unauthorized("unknown_subject", "No API key is linked to this token's subject.")
    return create_key_for_subject(subject, config)


def create_key_for_subject(subject: str, config: JwtConfig) -> ApiKey:
    """A key with the [jwt] limits. Its random secret is discarded: the token is the
    credential. Two first requests at once both try; the unique `jwt_subject` lets one
    insert win and the other reads the winner's row."""
    try:
        with transaction.atomic():
            api_key, _plaintext = ApiKey.objects.issue(
                name=f"jwt:{subject}"[:NAME_MAX_LENGTH],
                jwt_subject=subject,
                max_calls=config.max_calls,
                max_tokens_total=config.max_tokens_total,
                allowed_models=list(config.allowed_models),
                rpm=config.rpm,
                tpm=config.tpm,
                max_parallel=config.max_parallel,
            )
    except IntegrityError:
        return ApiKey.objects.get(jwt_subject=subject)
    log.info("created API key %s for a new JWT subject", api_key.prefix)
    return api_key
