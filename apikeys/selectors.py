"""Read queries about keys, and the precise reason a key cannot be used."""

from __future__ import annotations

from django.utils import timezone

from apikeys.keys import PresentedKey, hashes_match
from apikeys.models import ApiKey
from djangollmapi.errors import ApiError

BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def unauthorized(code: str, message: str) -> ApiError:
    return ApiError(401, code, message, headers=BEARER_CHALLENGE)


def verified_key(presented: PresentedKey) -> ApiKey:
    """The key if it exists, matches and is inside its validity window; else the exact
    ApiError (401 unknown/revoked, 403 outside the window). Quota is not checked:
    reading your own usage is allowed with a used-up key."""
    api_key = ApiKey.objects.filter(prefix=presented.prefix).first()
    if api_key is None or not hashes_match(api_key.secret_hash, presented.secret_hash):
        raise unauthorized("invalid_api_key", "Incorrect API key provided.")
    if api_key.revoked_at:
        raise unauthorized("key_revoked", "This API key has been revoked.")
    now = timezone.now()
    if api_key.valid_from and now < api_key.valid_from:
        raise ApiError(403, "key_not_yet_valid", f"This API key is valid from {api_key.valid_from.isoformat()}.")
    if api_key.valid_until and now >= api_key.valid_until:
        raise ApiError(403, "key_expired", f"This API key expired at {api_key.valid_until.isoformat()}.")
    return api_key


def rejection_reason(presented: PresentedKey, tokens_needed: int = 1) -> ApiError:
    """Why a consume failed, read after the fact (the rare path: one extra query)."""
    api_key = verified_key(presented)
    if api_key.max_calls is not None and api_key.calls_used >= api_key.max_calls:
        return ApiError(
            429,
            "quota_exhausted",
            f"This API key has used all {api_key.max_calls} of its calls.",
        )
    left = api_key.tokens_left
    if left is not None and left < tokens_needed:
        return ApiError(
            429,
            "token_budget_exhausted",
            f"This API key has {left} of its {api_key.max_tokens_total} tokens left; "
            f"this request may use up to {tokens_needed}. Lower max_tokens or ask for a larger budget.",
        )
    return ApiError(503, "key_busy", "The key changed while this call was checked; retry.")
