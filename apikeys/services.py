"""State changes on keys: consume and refund calls, revoke, reset."""

from __future__ import annotations

import json
from typing import NamedTuple

from django.db import connection
from django.db.models import F
from django.utils import timezone

from apikeys import selectors
from apikeys.keys import PresentedKey
from apikeys.models import ApiKey
from djangollmapi.errors import ApiError


class ConsumedCall(NamedTuple):
    """A call taken from a key's quota, with what the caller still needs to check."""

    key_id: int
    allowed_models: list[str]

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


CONSUME_SQL = f"""
UPDATE {ApiKey._meta.db_table}
   SET calls_used = calls_used + 1, last_used_at = %s
 WHERE prefix = %s AND secret_hash = %s AND revoked_at IS NULL
   AND (valid_from IS NULL OR valid_from <= %s)
   AND (valid_until IS NULL OR valid_until > %s)
   AND (max_calls IS NULL OR calls_used < max_calls)
RETURNING id, allowed_models
"""


def consume_call(presented: PresentedKey) -> ConsumedCall:
    """Authenticate and take one call in a single conditional UPDATE ... RETURNING, so
    the quota is exact under any concurrency. Matching the hash in SQL leaks nothing:
    the client controls the secret, not its SHA-256. Zero rows means the key cannot be
    used; one more read finds out why."""
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    with connection.cursor() as cursor:
        cursor.execute(CONSUME_SQL, [now, presented.prefix, presented.secret_hash, now, now])
        row = cursor.fetchone()
    if row is None:
        raise selectors.rejection_reason(presented)
    key_id, allowed = row
    return ConsumedCall(key_id, json.loads(allowed) if isinstance(allowed, str) else list(allowed or []))


def consume_call_for_model(presented: PresentedKey, model: str) -> ConsumedCall:
    """consume_call, then the key's model list; a call on a forbidden model is handed
    straight back so it costs nothing."""
    call = consume_call(presented)
    if not call.may_use(model):
        refund_call(call.key_id)
        raise ApiError(403, "model_not_allowed", f"This API key may not use the model {model!r}.", param="model")
    return call


def refund_call(key_id: int) -> None:
    """Give one call back. Callers make it idempotent per job (llmjobs.services)."""
    ApiKey.objects.filter(id=key_id, calls_used__gt=0).update(calls_used=F("calls_used") - 1)


def revoke_keys(queryset) -> int:
    return queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())


def reset_usage(queryset) -> int:
    return queryset.update(calls_used=0)
