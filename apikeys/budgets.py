"""Budgets per calendar period: calls, tokens, spend (USD) and device-seconds per day,
week (from Monday) and month, reset at midnight in `[limits] timezone`.

Taken in the transaction that takes the call (`llmjobs.admission.admit`), one UPSERT
per period that has a budget: it adds the call's reservation (the call, its token
reservation, its worst-case spend) to the period's row only if every budget still
holds, so a call that would cross a budget is refused before it runs (429
`budget_exhausted`, saying which and when it resets), never charged after the fact,
under any concurrency: the row is locked until the call's transaction commits. When
the job ends the reservation is replaced by what it used (`settle`) and a refunded
call gives its call back. Device-seconds are only known afterwards: a call is let in
while the period has device time left, and charged what it took when it ends.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from apikeys.models import BUDGET_PERIODS, BUDGETS, NANO, BudgetUse
from djangollmapi.errors import ApiError

TABLE = BudgetUse._meta.db_table
KEY_COLUMN = BudgetUse._meta.get_field("api_key").column
NAMES = {"calls": "calls", "tokens": "tokens", "spend_usd": "USD of spend", "device_s": "device-seconds"}
COLUMN = {"calls": "calls", "tokens": "tokens", "spend_usd": "spend_nano_usd", "device_s": "device_s"}


@dataclass(frozen=True)
class Period:
    """One calendar period with budgets: which, its first day, and its limits."""

    name: str  # daily, weekly, monthly
    starts: date
    limits: dict[str, float]  # budget name -> limit


def now() -> datetime:
    """The moment admission counts in (a function, so tests can move the clock)."""
    return timezone.now()


def period_start(period: str, day: date) -> date:
    if period == "daily":
        return day
    if period == "weekly":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def period_end(period: str, starts: date) -> datetime:
    """The next period's first midnight, in the configured zone (DST-aware)."""
    if period == "daily":
        following = starts + timedelta(days=1)
    elif period == "weekly":
        following = starts + timedelta(days=7)
    else:
        following = starts + timedelta(days=calendar.monthrange(starts.year, starts.month)[1])
    return datetime.combine(following, time(0), tzinfo=settings.LLM_CONFIG.limits.zone)


def periods_for(call: Any, moment: datetime) -> list[Period]:
    """The periods in which the key has a budget: its own (`ApiKey.budgets`), else the
    `[limits]` defaults, budget by budget."""
    defaults = settings.LLM_CONFIG.limits
    own = call.budgets or {}
    day = settings.LLM_CONFIG.limits.day_of(moment)
    found = []
    for period in BUDGET_PERIODS:
        limits = {}
        for name in BUDGETS:
            limit = (own.get(period) or {}).get(name, defaults.budget(period, name))
            if limit is not None:
                limits[name] = limit
        if limits:
            found.append(Period(period, period_start(period, day), limits))
    return found


def take(call: Any, tokens: int, spend: Decimal, moment: datetime) -> bool:
    """Add the call and its reservations to every period (at `moment`, the job's
    created_at) it has budgets in, or refuse it (429 `budget_exhausted`); inside the
    admission's transaction. False when the key has no budgets (nothing to settle)."""
    periods = periods_for(call, moment)
    for period in periods:
        taken = {"calls": 1, "tokens": tokens, "spend_usd": nano(spend), "device_s": 0}
        if not fits(period, taken) or not upsert(call.key_id, period, taken):
            raise exhausted(call.key_id, period, taken, moment)
    return bool(periods)


def nano(usd: Decimal | float | int) -> int:
    """Dollars in whole billionths, the unit spend is summed in."""
    return int((Decimal(str(usd)) * NANO).to_integral_value())


def limit_in_units(name: str, limit: float) -> float | int:
    """A budget in the unit its column counts: spend in billionths of a dollar."""
    return nano(limit) if name == "spend_usd" else limit


def fits(period: Period, taken: dict[str, Any]) -> bool:
    """Whether the call alone fits the period's budgets (a fresh period's row)."""
    return all(holds(name, limit, None, taken) for name, limit in period.limits.items())


def upsert(key_id: int, period: Period, taken: dict[str, Any]) -> bool:
    """One statement: insert the period's row with the call, or add the call to it if
    every budget still holds after (device time: while some is left)."""
    conditions, params = [], []
    for name, limit in period.limits.items():
        if name == "device_s":
            conditions.append(f"{TABLE}.device_s < %s")
        else:
            column = COLUMN[name]
            conditions.append(f"{TABLE}.{column} + excluded.{column} <= %s")
        params.append(limit_in_units(name, limit))
    sql = (
        f"INSERT INTO {TABLE} ({KEY_COLUMN}, period, starts, calls, tokens, spend_nano_usd, device_s)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)"
        f" ON CONFLICT ({KEY_COLUMN}, period, starts) DO UPDATE SET"
        f" calls = {TABLE}.calls + excluded.calls, tokens = {TABLE}.tokens + excluded.tokens,"
        f" spend_nano_usd = {TABLE}.spend_nano_usd + excluded.spend_nano_usd"
        f" WHERE {' AND '.join(conditions)} RETURNING calls"
    )
    starts = connection.ops.adapt_datefield_value(period.starts)
    values = [key_id, period.name, starts, 1, taken["tokens"], taken["spend_usd"], 0]
    with connection.cursor() as cursor:
        cursor.execute(sql, [*values, *params])
        return cursor.fetchone() is not None


def exhausted(key_id: int, period: Period, taken: dict[str, Any], moment: datetime) -> ApiError:
    """429 naming the budget that does not hold and when its period resets."""
    used = BudgetUse.objects.filter(api_key_id=key_id, period=period.name, starts=period.starts).first()
    name = next(
        (name for name in period.limits if not holds(name, period.limits[name], used, taken)), next(iter(period.limits))
    )
    resets = period_end(period.name, period.starts)
    wait = max(1, int((resets - moment).total_seconds()) + 1)
    message = (
        f"This API key's {period.name} budget of {period.limits[name]:g} {NAMES[name]} is used up; "
        f"it resets at {resets.isoformat()} ({settings.LLM_CONFIG.limits.timezone})."
    )
    return ApiError(429, "budget_exhausted", message, headers={"Retry-After": str(wait)})


def holds(name: str, limit: float, used: BudgetUse | None, taken: dict[str, Any]) -> bool:
    """Whether budget `name` holds once `taken` is added to what `used` has spent (None:
    a fresh period); device time only needs some left."""
    spent = getattr(used, COLUMN[name], 0) if used else 0
    if name == "device_s":
        return spent < limit
    return spent + taken[name] <= limit_in_units(name, limit)


SETTLE_SQL = (
    f"UPDATE {TABLE} SET calls = calls + %s, tokens = tokens + %s, spend_nano_usd = spend_nano_usd + %s,"
    f" device_s = device_s + %s WHERE {KEY_COLUMN} = %s AND ("
    + " OR ".join(["(period = %s AND starts = %s)"] * len(BUDGET_PERIODS))
    + ")"
)


def settle(
    key_id: int, admitted_at: datetime, *, calls: int = 0, tokens: int = 0, spend: Decimal = Decimal(0), device_s=0.0
) -> None:
    """Correct the rows of the periods the call was admitted in (by its admission time,
    so a call that ends after midnight settles in the day it was taken): `calls` -1 for
    a refund, `tokens` / `spend` what it used less what it reserved, `device_s` taken."""
    if not (calls or tokens or spend or device_s):
        return
    day = settings.LLM_CONFIG.limits.day_of(admitted_at)
    periods = []
    for period in BUDGET_PERIODS:
        periods += [period, connection.ops.adapt_datefield_value(period_start(period, day))]
    with connection.cursor() as cursor:
        cursor.execute(SETTLE_SQL, [calls, tokens, nano(spend), device_s, key_id, *periods])
