"""An operator saving a key in the admin while its calls run never loses usage: the
counters (`calls_used`, `tokens_used`, `revoked_at`) are never written by a form.

On PostgreSQL (CI) the old full save lost 25 of 180 calls here; on SQLite every
transaction takes the write lock first (IMMEDIATE), which hides the race."""

from __future__ import annotations

import threading
from html.parser import HTMLParser

import pytest
import requests
from django.contrib.auth import get_user_model

from llmjobs.models import Job
from tests.helpers import key_row

pytestmark = pytest.mark.faults

CLIENTS = 12
CALLS_EACH = 15
SAVES = 25


class FormFields(HTMLParser):
    """The values a browser would post back for the page's change form, unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: list[tuple[str, str]] = []
        self.in_form = False
        self.textarea: str | None = None
        self.select: str | None = None
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {name: value or "" for name, value in attrs}
        if tag == "form" and attr.get("id") == "apikey_form":
            self.in_form = True
        if not self.in_form:
            return
        if tag == "input" and attr.get("name"):
            kind = attr.get("type", "text")
            if kind in {"checkbox", "radio"}:
                if "checked" in attr:
                    self.fields.append((attr["name"], attr.get("value", "on")))
            elif kind != "submit":
                self.fields.append((attr["name"], attr.get("value", "")))
        elif tag == "textarea":
            self.textarea, self.text = attr["name"], ""
        elif tag == "select":
            self.select = attr["name"]
        elif tag == "option" and self.select and "selected" in attr:
            self.fields.append((self.select, attr.get("value", "")))

    def handle_data(self, data: str) -> None:
        if self.textarea is not None:
            self.text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea" and self.textarea is not None:
            self.fields.append((self.textarea, self.text.removeprefix("\n")))
            self.textarea = None
        elif tag == "select":
            self.select = None
        elif tag == "form":
            self.in_form = False


def admin_session(live) -> requests.Session:
    get_user_model().objects.create_superuser("saver", "s@example.com", "a long passphrase")
    session = requests.Session()
    session.get(f"{live.url}/admin/login/", timeout=10)
    answer = session.post(
        f"{live.url}/admin/login/?next=/admin/",
        data={
            "username": "saver",
            "password": "a long passphrase",
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
            "next": "/admin/",
        },
        headers={"Referer": f"{live.url}/admin/login/"},
        timeout=10,
    )
    assert answer.status_code == 200 and "sessionid" in session.cookies
    return session


def save_unchanged(session: requests.Session, url: str) -> None:
    """Open the key's change form and press Save without touching anything."""
    parser = FormFields()
    parser.feed(session.get(url, timeout=30).text)
    assert any(name == "name" for name, _ in parser.fields), "the change form was not found"
    answer = session.post(url, data=[*parser.fields, ("_save", "Save")], headers={"Referer": url}, timeout=30)
    assert answer.status_code == 200 and "was changed successfully" in answer.text, answer.text[:500]


def test_saving_a_key_during_its_calls_loses_no_usage(live, make_key):
    plaintext = make_key(max_calls=1000)
    api_key = key_row(plaintext)
    session = admin_session(live)
    url = f"{live.url}/admin/apikeys/apikey/{api_key.id}/change/"
    failures: list[str] = []

    def call() -> None:
        with requests.Session() as client:
            for n in range(CALLS_EACH):
                answer = client.post(
                    f"{live.url}/api/",
                    json={"text": f"call {n}", "model": "echo"},
                    headers={"Authorization": f"Bearer {plaintext}"},
                    timeout=60,
                )
                if answer.status_code != 200:
                    failures.append(answer.text)

    callers = [threading.Thread(target=call) for _ in range(CLIENTS)]
    for thread in callers:
        thread.start()
    for _ in range(SAVES):
        save_unchanged(session, url)
    for thread in callers:
        thread.join(120)
    assert not failures, failures[:3]
    api_key.refresh_from_db()
    charged = Job.objects.filter(api_key=api_key).count()
    assert charged == CLIENTS * CALLS_EACH
    assert api_key.calls_used == charged
    used = Job.objects.filter(api_key=api_key).values_list("prompt_tokens", "completion_tokens")
    assert api_key.tokens_used == sum((prompt or 0) + (completion or 0) for prompt, completion in used)
