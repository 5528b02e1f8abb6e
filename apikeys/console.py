"""The admin as a console: usage charts for one key's page and for the overview of all
keys, drawn as inline SVG bars on the server from the daily rollups (`llmjobs.usage`).
No script and no chart library: the page works offline and in any browser, and a bar
per day is a plain `<rect>` a test (or an operator's scraper) can read."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.template.loader import render_to_string
from django.utils.safestring import SafeString

from llmjobs import usage

DAYS = 30
WIDTH, HEIGHT, BAR_GAP = 600, 120, 2


@dataclass(frozen=True)
class Bar:
    day: str
    value: float
    label: str
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Chart:
    metric: str
    title: str
    total: str
    peak: str
    first_day: str
    last_day: str
    bars: list[Bar]


METRICS = (
    ("calls", "Calls", lambda day: day.calls, "{:,.0f}"),
    ("tokens", "Tokens", lambda day: day.tokens, "{:,.0f}"),
    ("errors", "Errors", lambda day: day.errors, "{:,.0f}"),
    ("spend", "Spend (USD)", lambda day: day.cost_usd, "{:,.4f}"),
)


def usage_charts(key_id: int | None = None, days: int = DAYS) -> SafeString:
    """The four charts (calls, tokens, errors, spend per day) of one key or, for
    None, of every key, for the last `days` days."""
    series = usage.daily_series(key_id, days)
    charts = [chart(series, *metric) for metric in METRICS]
    return render_to_string("admin/apikeys/usage_charts.html", {"charts": charts, "days": days})


def chart(series: list[usage.Day], metric: str, title: str, value_of, number: str) -> Chart:
    """Bars scaled to the busiest day; a day without use is a bar of height 0."""
    values = [float(value_of(day) or 0) for day in series]
    peak = max(values, default=0.0)
    slot = WIDTH / max(len(series), 1)
    bars = []
    for index, (day, value) in enumerate(zip(series, values, strict=True)):
        height = HEIGHT * value / peak if peak else 0.0
        label = f"{day.day.isoformat()}: {number.format(value)}"
        bars.append(Bar(day.day.isoformat(), value, label, index * slot, HEIGHT - height, slot - BAR_GAP, height))
    total = sum((Decimal(str(value)) for value in values), Decimal(0))
    return Chart(
        metric,
        title,
        number.format(total),
        number.format(peak),
        series[0].day.isoformat() if series else "",
        series[-1].day.isoformat() if series else "",
        bars,
    )


def overview_context(days: int = DAYS) -> dict:
    """What the overview page shows besides its charts: the top keys and models."""
    return {
        "charts": usage_charts(None, days),
        "top_keys": usage.top("api_key", days),
        "top_models": usage.top("model", days),
        "days": days,
    }
