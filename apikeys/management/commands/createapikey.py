"""`manage.py createapikey`: the operator's way to issue a key from a shell."""

from __future__ import annotations

from datetime import UTC, datetime

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from apikeys.models import ApiKey


def parse_moment(value: str) -> datetime:
    """ISO 8601 date or date-time; a naive value is taken in UTC."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise CommandError(f"{value!r} is not an ISO 8601 date or date-time") from exc
    return moment if timezone.is_aware(moment) else moment.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = "Issue an API key and print it once (it is stored only as a hash)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--name", required=True)
        parser.add_argument("--owner-email", default="")
        parser.add_argument("--note", default="")
        parser.add_argument("--max-calls", type=int, default=None, help="omit for unlimited; 0 = no calls")
        parser.add_argument(
            "--max-tokens", type=int, default=None, help="lifetime token budget (prompt + completion); omit for none"
        )
        parser.add_argument("--valid-from", type=parse_moment, default=None)
        parser.add_argument("--valid-until", type=parse_moment, default=None)
        parser.add_argument("--models", default="", help="comma-separated model names; omit for all")
        parser.add_argument("--rpm", type=int, default=None, help="requests per minute; omit for [limits] rpm")
        parser.add_argument("--tpm", type=int, default=None, help="tokens per minute; omit for [limits] tpm")
        parser.add_argument(
            "--max-parallel", type=int, default=None, help="requests in flight at once; omit for [limits] max_parallel"
        )
        parser.add_argument("--quiet", action="store_true", help="print only the key")

    def handle(self, *args, **opts) -> None:
        if opts["max_calls"] is not None and opts["max_calls"] < 0:
            raise CommandError("--max-calls must be 0 or more")
        if opts["max_tokens"] is not None and opts["max_tokens"] < 0:
            raise CommandError("--max-tokens must be 0 or more")
        for flag in ("rpm", "tpm", "max_parallel"):
            if opts[flag] is not None and opts[flag] < 1:
                raise CommandError(f"--{flag.replace('_', '-')} must be 1 or more")
        if opts["valid_from"] and opts["valid_until"] and opts["valid_until"] <= opts["valid_from"]:
            raise CommandError("--valid-until must be after --valid-from")
        models = [name.strip() for name in opts["models"].split(",") if name.strip()]
        api_key, plaintext = ApiKey.objects.issue(
            name=opts["name"],
            owner_email=opts["owner_email"],
            note=opts["note"],
            max_calls=opts["max_calls"],
            max_tokens_total=opts["max_tokens"],
            valid_from=opts["valid_from"],
            valid_until=opts["valid_until"],
            allowed_models=models,
            rpm=opts["rpm"],
            tpm=opts["tpm"],
            max_parallel=opts["max_parallel"],
        )
        if opts["quiet"]:
            self.stdout.write(plaintext)
            return
        self.stdout.write(f"Created API key {api_key.name!r} (prefix {api_key.prefix}).")
        self.stdout.write("Copy it now; it is not stored and will not be shown again:")
        self.stdout.write(plaintext)
