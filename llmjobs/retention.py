"""How long the usage log keeps its rows: old jobs dropped (or only their payloads),
in batches, while the daily rollups (`UsageDay`) that the console reads stay whole."""

from __future__ import annotations

import re
from datetime import timedelta

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from llmjobs.models import Job

BATCH = 5000  # rows a transaction deletes: long enough to be quick, short enough to lock little
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
DURATION = re.compile(r"^(\d+)([smhdw])$")


def parse_age(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `3600s`, `2w` as a timedelta; ValueError otherwise."""
    match = DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not an age like 30d, 12h, 90m, 3600s or 2w")
    return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


def old_jobs(older_than: timedelta) -> QuerySet[Job]:
    """Ended jobs made more than `older_than` ago; a queued or running job is never touched."""
    return Job.objects.filter(created_at__lt=timezone.now() - older_than).exclude(status__in=Job.ACTIVE)


def prune_jobs(older_than: timedelta) -> int:
    """Delete the old jobs' rows, a batch per transaction; the number deleted."""
    deleted = 0
    while batch := list(old_jobs(older_than).values_list("id", flat=True)[:BATCH]):
        with transaction.atomic():
            deleted += Job.objects.filter(id__in=batch).delete()[0]
    return deleted


def drop_payloads(older_than: timedelta) -> int:
    """Blank the old jobs' prompts and outputs, keeping the rows (tokens, cost, times);
    the number of rows blanked."""
    dropped = 0
    with_payload = old_jobs(older_than).exclude(input_text="", output__isnull=True)
    while batch := list(with_payload.values_list("id", flat=True)[:BATCH]):
        with transaction.atomic():
            dropped += Job.objects.filter(id__in=batch).update(input_text="", output=None)
    return dropped
