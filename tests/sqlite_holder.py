"""Run in a child process by tests/djangollmapi/test_sqlite_writers.py: hold a write
transaction on a database until told to let go. A module of its own, importing Django
only after configuring it, so that a spawned child can import it."""

from __future__ import annotations


def hold_a_transaction(path: str, holding, release) -> None:
    import django
    from django.conf import settings

    settings.configure(INSTALLED_APPS=[], USE_TZ=True)
    django.setup()
    import time

    from django.db import connections, transaction

    filled = connections.configure_settings(
        {
            "default": {},
            "holder": {
                "ENGINE": "djangollmapi.sqlite",
                "NAME": path,
                "OPTIONS": {"timeout": 5, "transaction_mode": "IMMEDIATE"},
            },
        }
    )
    connections.settings["holder"] = filled["holder"]
    with transaction.atomic(using="holder"), connections["holder"].cursor() as cursor:
        cursor.execute("INSERT INTO written VALUES (%s, %s)", ["other process", time.time()])
        holding.set()
        release.wait(30)
