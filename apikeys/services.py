"""State changes on keys: admission (take a call, exactly, under any concurrency),
refunds and settlements (for the job lifecycle only), revoke, reset."""

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
    weight: int = 1  # its share of a busy device (the worker's fair admission)
    # The key's own rate limits (None: the [limits] default) and per-model ones.
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    model_limits: dict | None = None
    budgets: dict | None = None  # the key's own period budgets (apikeys.budgets)

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


CONSUME_SQL = f"""
UPDATE {ApiKey._meta.db_table}
   SET calls_used = calls_used + 1, tokens_used = tokens_used + %s, last_used_at = %s
 WHERE prefix = %s AND secret_hash = %s AND revoked_at IS NULL
   AND (valid_from IS NULL OR valid_from <= %s)
   AND (valid_until IS NULL OR valid_until > %s)
   AND (max_calls IS NULL OR calls_used < max_calls)
   AND (max_tokens_total IS NULL OR tokens_used + %s <= max_tokens_total)
RETURNING id, allowed_models, weight, rpm, tpm, max_parallel, model_limits, budgets
"""


def consume_call(presented: PresentedKey, reserve_tokens: int = 0) -> ConsumedCall:
    """Authenticate, take one call and reserve `reserve_tokens` of the key's token
    budget in a single conditional UPDATE ... RETURNING, so quota and budget are exact
    under any concurrency. Matching the hash in SQL leaks nothing: the client controls
    the secret, not its SHA-256. Zero rows means the key cannot be used; one more read
    finds out why.

    A call that reserves nothing (e.g. `/api/`, embeddings) still needs one token left,
    so a spent budget stops every kind of call; what it really used is settled later."""
    needed = max(reserve_tokens, 1)
    for _attempt in range(CONSUME_ATTEMPTS):
        row = try_consume(presented, reserve_tokens, needed)
        if row is not None:
            key_id, allowed, weight, rpm, tpm, max_parallel, model_limits, budgets = row
            limits = (rpm, tpm, max_parallel, from_json(model_limits, dict), from_json(budgets, dict))
            return ConsumedCall(key_id, from_json(allowed, list), weight, *limits)
        reason = selectors.rejection_reason(presented, needed)
        if reason.code != "key_busy":
            raise reason
    raise reason


def from_json(value, kind: type):
    """A JSON column as RETURNING gives it: text on SQLite, decoded on PostgreSQL."""
    value = json.loads(value) if isinstance(value, str) else value
    return kind(value or kind())


# A refusal with no reason left when read means a concurrent call changed the key in
# between (e.g. settled its tokens, freeing room): try again before saying "busy".
CONSUME_ATTEMPTS = 3


def try_consume(presented: PresentedKey, reserve_tokens: int, needed: int) -> tuple | None:
    with connection.cursor() as cursor:
        cursor.execute(CONSUME_SQL, consume_params(presented, reserve_tokens, needed))
        return cursor.fetchone()


def consume_params(presented: PresentedKey, reserve_tokens: int, needed: int) -> list:
    """CONSUME_SQL's parameters, in its order, at this moment."""
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    return [reserve_tokens, now, presented.prefix, presented.secret_hash, now, now, needed]


def take_call(presented: PresentedKey, model: str, reserve_tokens: int = 0) -> ConsumedCall:
    """Admission: the key, its window, one call and `reserve_tokens` of its budget in
    consume_call's single UPDATE, then the key's model list. It runs
    inside the transaction that records the call's job, so a refusal raised here (a
    forbidden model included) rolls the UPDATE back with it: a refused call costs
    nothing and needs no refund. Returns the call: the key's id and its weight."""
    if not connection.in_atomic_block:
        raise RuntimeError("take_call must run inside the transaction that records the job")
    call = consume_call(presented, reserve_tokens)
    if not call.may_use(model):
        raise ApiError(403, "model_not_allowed", f"This API key may not use the model {model!r}.", param="model")
    return call


def refund_call(key_id: int) -> None:
    """Give one call back. Only the job lifecycle calls it, once per job (llmjobs.lifecycle)."""
    ApiKey.objects.filter(id=key_id, calls_used__gt=0).update(calls_used=F("calls_used") - 1)


def settle_tokens(key_id: int, delta: int) -> None:
    """Correct a reservation by what the call really used (`used - reserved`). One
    atomic increment, so concurrent settlements never lose each other's updates.
    Only the job lifecycle calls it, once per job (llmjobs.lifecycle)."""
    statement = settle_statement(key_id, delta)
    if statement is not None:
        with connection.cursor() as cursor:
            cursor.execute(*statement)


def settle_statement(key_id: int, delta: int) -> tuple[str, list[int]] | None:
    """`settle_tokens`' UPDATE and its parameters, for a caller that sends it with
    others; None when there is nothing to correct."""
    return (SETTLE_SQL, [delta, key_id]) if delta else None


SETTLE_SQL = f"UPDATE {ApiKey._meta.db_table} SET tokens_used = tokens_used + %s WHERE id = %s"


def revoke_keys(queryset) -> int:
    return queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())


def reset_usage(queryset) -> int:
    """Start the key's counts afresh. Calls in flight settle against the new count,
    which may then dip below zero by their reservations until they finish."""
    return queryset.update(calls_used=0, tokens_used=0)
