"""`manage.py reapjobs`: the operator's sweep for lost jobs (`llmjobs.reaper`), for when
no worker's supervisor is running to sweep on its own, e.g. every worker of a device
died for good. A job must be missed for `[server] reap_after_s` before it is ended (or
its message moved to a live replica's queue), so the command watches that long
(sweeping every few seconds, with any supervisors sweeping too), then prints what it
ended and moved; `--once` sweeps a single time."""

from __future__ import annotations

import time

import redis
from django.core.management.base import BaseCommand, CommandError

from llmjobs import reaper


class Command(BaseCommand):
    help = "Fail and refund the jobs no queue and no live worker holds any more, watching [server] reap_after_s."

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="sweep once: end only what earlier sweeps have missed for reap_after_s already",
        )

    def handle(self, *args, once: bool, **options) -> None:
        grace = reaper.grace_s()
        every = reaper.sweep_every_s(grace)
        if not once:
            self.stdout.write(f"Watching every queue for {grace + every:g} s for jobs nothing holds...")
        deadline = time.monotonic() + (0 if once else grace + every)
        swept: list[reaper.Lost | reaper.Moved] = []
        while True:
            try:
                outcomes = reaper.sweep(grace)
            except redis.RedisError as exc:
                raise CommandError(f"Redis cannot be read ({exc}); nothing was ended.") from None
            for outcome in outcomes:
                self.stdout.write(outcome.describe())
            swept += outcomes
            if time.monotonic() >= deadline:
                break
            time.sleep(every)
        moved = sum(isinstance(outcome, reaper.Moved) for outcome in swept)
        if moved:
            self.stdout.write(f"Moved {moved} stranded job(s) to a live queue.")
        self.stdout.write(f"Ended {len(swept) - moved} lost job(s).")
