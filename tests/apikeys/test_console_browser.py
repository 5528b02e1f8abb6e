"""The console's charts, rendered by a real headless Chromium (Debian's package, driven
by Playwright) from the live server: a bar per day, tall on the days with calls."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta

import pytest
from django.contrib.auth.models import User

from apikeys.models import ApiKey
from llmjobs import usage
from llmjobs.models import UsageDay
from tests.conftest import data_dir

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
PAST_CALLS = {2: 5, 5: 1, 9: 12}  # days ago → calls (rollups as earlier days left them)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium; CI (which installs it) sets DLA_REQUIRE_BROWSER so a missing
    browser fails there instead of skipping."""
    if not shutil.which(CHROMIUM):
        if os.environ.get("DLA_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread, which Django's ORM takes
    # for an async context; the test's own queries are synchronous (Playwright and
    # Django both document this switch for it).
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "1"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            yield browser
            browser.close()
    finally:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


def logged_in_page(browser, live, next_path: str):
    User.objects.create_superuser("operator", "op@example.com", "a long passphrase")
    page = browser.new_page()
    page.goto(f"{live.url}/admin/login/?next={next_path}")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "a long passphrase")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live.url}{next_path}")
    return page


def drawn_bars(page, metric: str) -> dict[str, float]:
    """Each day's bar in the chart of `metric`: its height on the screen, in pixels."""
    chart = page.locator(f"figure.usage-chart[data-metric={metric}] svg")
    assert chart.bounding_box()["width"] >= 300  # drawn, not collapsed
    bars = page.locator(f"figure.usage-chart[data-metric={metric}] rect.bar")
    return {bar.get_attribute("data-day"): bar.bounding_box()["height"] for bar in bars.all()}


def days_with_calls(live, api_key: ApiKey, plaintext: str) -> set[str]:
    """Rollups on earlier days, and one real call today."""
    today = usage.today()
    for days_ago, calls in PAST_CALLS.items():
        UsageDay.objects.create(
            day=today - timedelta(days=days_ago), api_key=api_key, model="echo", requests=calls, prompt_tokens=calls
        )
    assert live.post("/api/", plaintext, json={"text": "hello", "model": "echo"}).status_code == 200
    return {(today - timedelta(days=n)).isoformat() for n in [0, *PAST_CALLS]}


def assert_a_bar_per_day_tall_where_called(bars: dict[str, float], called: set[str]) -> None:
    assert len(bars) == 30
    assert {day for day, height in bars.items() if height > 0} == called
    tallest = max(bars, key=bars.get)
    assert tallest == (usage.today() - timedelta(days=9)).isoformat()  # 12 calls, the busiest


def test_a_key_page_charts_its_calls_per_day(browser, live):
    api_key, plaintext = ApiKey.objects.issue(name="charted")
    called = days_with_calls(live, api_key, plaintext)
    page = logged_in_page(browser, live, f"/admin/apikeys/apikey/{api_key.id}/change/")

    assert_a_bar_per_day_tall_where_called(drawn_bars(page, "calls"), called)
    assert set(drawn_bars(page, "tokens")) == set(drawn_bars(page, "calls"))
    assert page.locator("figure[data-metric=calls] figcaption").inner_text().startswith("Calls: 19 in 30 days")
    page.screenshot(path=str(data_dir() / "console-key.png"), full_page=True)


def test_the_overview_charts_every_key_and_lists_the_top_ones(browser, live):
    api_key, plaintext = ApiKey.objects.issue(name="charted")
    called = days_with_calls(live, api_key, plaintext)
    other, _ = ApiKey.objects.issue(name="other")
    UsageDay.objects.create(day=usage.today(), api_key=other, model="words", requests=2, failed=1)
    page = logged_in_page(browser, live, "/admin/apikeys/apikey/usage/")

    assert_a_bar_per_day_tall_where_called(drawn_bars(page, "calls"), called)
    errors = drawn_bars(page, "errors")
    assert {day for day, height in errors.items() if height > 0} == {usage.today().isoformat()}
    top_keys = page.locator("#top-keys tbody tr").all_inner_texts()
    assert top_keys[0].startswith("charted") and top_keys[1].startswith("other")
    assert page.locator("#top-models").inner_text().count("echo") == 1
    page.screenshot(path=str(data_dir() / "console-overview.png"), full_page=True)
