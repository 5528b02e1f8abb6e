"""The daily usage rollups (`UsageDay`): what each ended job adds to its key's day.

`llmjobs.lifecycle` calls `add` inside the transaction that ends a job, at each of its
once-only claims (the job leaving `queued`/`running`, its tokens settled, its refund),
so a row counts every job exactly once, whichever path ended it, and a recount from the
Job rows gives the same numbers. One UPSERT statement a call; the day is the one the
call was made on, in `[limits] timezone`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils.dateparse import parse_datetime

from llmjobs.models import UsageDay


@dataclass(frozen=True)
class Counts:
    """What one job adds to its day; the names are UsageDay's columns."""

    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    refunded: int = 0
    input_chars: int = 0
    output_chars: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    device_s: float = 0.0


COLUMNS = [field.name for field in fields(Counts)]
TABLE = UsageDay._meta.db_table
KEY_COLUMN = UsageDay._meta.get_field("api_key").column
UPSERT_SQL = (
    f"INSERT INTO {TABLE} (day, {KEY_COLUMN}, model, {', '.join(COLUMNS)})"
    f" VALUES (%s, %s, %s, {', '.join(['%s'] * len(COLUMNS))})"
    f" ON CONFLICT (day, {KEY_COLUMN}, model) DO UPDATE SET "
    + ", ".join(f"{column} = {TABLE}.{column} + excluded.{column}" for column in COLUMNS)
)


def ended(status: str, *, refunded: bool = False, **counts: Any) -> Counts:
    """A job that just ended with `status` (succeeded / failed / cancelled)."""
    return Counts(requests=1, refunded=int(refunded), **{str(status): 1}, **counts)


def summed(first: Counts, second: Counts) -> Counts:
    """What two jobs add to one day together."""
    return Counts(**{column: getattr(first, column) + getattr(second, column) for column in COLUMNS})


def add(key_id: int | None, model: str, created_at: datetime | str, counts: Counts, cursor: Any = None) -> None:
    """Add `counts` to the key's row for the day `created_at` falls on (inside the
    caller's transaction, on its `cursor` if it has one open). A job whose key was
    deleted has no row to count in."""
    statement = add_statement(key_id, model, created_at, counts)
    if statement is None:
        return
    if cursor is not None:
        cursor.execute(*statement)
        return
    with connection.cursor() as own:
        own.execute(*statement)


def add_statement(
    key_id: int | None, model: str, created_at: datetime | str, counts: Counts
) -> tuple[str, list[Any]] | None:
    """`add`'s UPSERT and its parameters, for a caller that sends it with others; None
    when there is nothing to count (no key, or rollups off)."""
    if key_id is None or not settings.LLM_CONFIG.server.usage_rollups:
        return None
    params = [connection.ops.adapt_datefield_value(usage_day(created_at)), key_id, model]
    params += [getattr(counts, column) for column in COLUMNS]
    return UPSERT_SQL, params


def usage_day(created_at: datetime | str) -> date:
    """The calendar day (in `[limits] timezone`) a call made at `created_at` counts on."""
    return settings.LLM_CONFIG.limits.day_of(as_datetime(created_at))


def as_datetime(value: datetime | str) -> datetime:
    """A raw row's time as an aware datetime: SQLite gives it as text, in UTC."""
    if isinstance(value, str):
        value = parse_datetime(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
