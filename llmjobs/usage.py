"""What the daily rollups say (`UsageDay`, kept by `llmjobs.rollups`): a key's usage
per day for `/api/usage/`, and the console's series, totals and top keys and models.
Every query reads the rollups, never the Job table, so it costs the same with a
thousand jobs or millions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal

from django.conf import settings
from django.db.models import F, QuerySet, Sum
from django.utils import timezone

from llmjobs.models import UsageDay

SUMMED = (
    "requests",
    "succeeded",
    "failed",
    "cancelled",
    "refunded",
    "input_chars",
    "output_chars",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "device_s",
)


def today() -> date:
    """Today in `[limits] timezone`, the calendar the rollups count in."""
    return settings.LLM_CONFIG.limits.day_of(timezone.now())


def usage_by_day(key_id: int) -> list[dict]:
    """The key's days with calls, oldest first, JSON-ready (`/api/usage/`)."""
    rows = UsageDay.objects.filter(api_key_id=key_id).values("day").annotate(**sums()).order_by("day")
    return [json_day(row) for row in rows]


def sums() -> dict[str, Sum]:
    return {column: Sum(column) for column in SUMMED}


def json_day(row: dict) -> dict:
    """An ISO day, the calls charged (refunds deducted), the spend as a number, the
    device-seconds rounded to the millisecond."""
    return {
        **row,
        "day": row["day"].isoformat(),
        "calls": row["requests"] - row["refunded"],
        "cost_usd": float(row["cost_usd"]),
        "device_s": round(row["device_s"], 3),
    }


@dataclass(frozen=True)
class Day:
    """One bar of each of the console's charts."""

    day: date
    calls: int = 0
    tokens: int = 0
    errors: int = 0
    cost_usd: Decimal = Decimal(0)


def daily_series(key_id: int | None = None, days: int = 30) -> list[Day]:
    """The last `days` days up to today, oldest first, for one key or (None) all keys:
    every day present, a day without calls as zeros, so a chart has one bar a day."""
    last = today()
    first = last - timedelta(days=days - 1)
    rows = {
        row["day"]: row
        for row in window(first, key_id)
        .values("day")
        .annotate(
            calls=Sum(F("requests") - F("refunded")),
            tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
            errors=Sum("failed"),
            spend=Sum("cost_usd"),
        )
    }
    series = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        row = rows.get(day)
        if row is None:
            series.append(Day(day))
        else:
            series.append(Day(day, row["calls"], row["tokens"], row["errors"], Decimal(row["spend"] or 0)))
    return series


def window(first: date, key_id: int | None = None) -> QuerySet[UsageDay]:
    rows = UsageDay.objects.filter(day__gte=first)
    return rows if key_id is None else rows.filter(api_key_id=key_id)


def top(group: str, days: int = 30, limit: int = 10) -> list[dict]:
    """The keys (`group="api_key"`) or models (`"model"`) with the most calls in the
    last `days` days, with their tokens, errors and spend."""
    first = today() - timedelta(days=days - 1)
    names = ["api_key__name", "api_key__prefix"] if group == "api_key" else []
    return list(
        window(first)
        .values(group, *names)
        .annotate(
            calls=Sum(F("requests") - F("refunded")),
            tokens=Sum(F("prompt_tokens") + F("completion_tokens")),
            errors=Sum("failed"),
            spend=Sum("cost_usd"),
            device_s=Sum("device_s"),
        )
        .order_by("-calls", group)[:limit]
    )
