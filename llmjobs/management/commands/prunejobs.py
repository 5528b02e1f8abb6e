"""`manage.py prunejobs --older-than 30d`: drop old jobs from the usage log, keeping
the daily rollups the console and `/api/usage/` read; run it from cron or a timer."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from llmjobs import retention


class Command(BaseCommand):
    help = "Delete ended jobs older than an age (or only their prompts and outputs); the daily rollups stay."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--older-than", required=True, help="an age: 30d, 12h, 90m, 3600s or 2w")
        parser.add_argument(
            "--payloads-only",
            action="store_true",
            help="keep the rows (tokens, cost, times), blank their prompts and outputs",
        )

    def handle(self, *args, older_than: str, payloads_only: bool, **options) -> None:
        try:
            age = retention.parse_age(older_than)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if payloads_only:
            count = retention.drop_payloads(age)
            self.stdout.write(f"Dropped the payloads of {count} job(s) older than {older_than}.")
        else:
            count = retention.prune_jobs(age)
            self.stdout.write(f"Deleted {count} job(s) older than {older_than}; the daily rollups are kept.")
