"""Who may call: one row per API key."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

from apikeys import keys

RATE_LIMITS = ("rpm", "tpm", "max_parallel")


def valid_model_limits(value) -> bool:
    """{model: {limit: positive int}} with limits from RATE_LIMITS."""
    if not isinstance(value, dict):
        return False
    for name, limits in value.items():
        if not (isinstance(name, str) and name and isinstance(limits, dict) and limits):
            return False
        for limit, number in limits.items():
            if limit not in RATE_LIMITS or isinstance(number, bool) or not isinstance(number, int) or number < 1:
                return False
    return True


BUDGET_PERIODS = ("daily", "weekly", "monthly")
NANO = 1_000_000_000  # BudgetUse counts spend in billionths of a dollar
BUDGETS = ("calls", "tokens", "spend_usd", "device_s")


def valid_budgets(value) -> bool:
    """{period: {budget: number >= 0}}, calls and tokens whole numbers."""
    if not isinstance(value, dict):
        return False
    for period, budgets in value.items():
        if period not in BUDGET_PERIODS or not isinstance(budgets, dict) or not budgets:
            return False
        for name, number in budgets.items():
            whole = name in ("calls", "tokens")
            kinds = (int,) if whole else (int, float)
            if name not in BUDGETS or isinstance(number, bool) or not isinstance(number, kinds) or number < 0:
                return False
    return True


class ApiKeyManager(models.Manager):
    def issue(self, name: str, **fields) -> tuple[ApiKey, str]:
        """Create a key and return it with its plaintext, which is never stored or
        shown again."""
        credentials = keys.new_credentials()
        api_key = self.create(name=name, prefix=credentials.prefix, secret_hash=credentials.secret_hash, **fields)
        return api_key, credentials.plaintext


# Written only by `apikeys.services` (atomic updates as calls are taken, settled,
# refunded, keys revoked), never by saving a loaded row: a form opened before a call
# would write its stale counts back.
COUNTERS = frozenset({"calls_used", "tokens_used", "revoked_at", "last_used_at"})


class ApiKey(models.Model):
    name = models.CharField(max_length=200)
    owner_email = models.EmailField(blank=True)
    note = models.TextField(blank=True)
    prefix = models.CharField(max_length=keys.PREFIX_LENGTH, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    valid_from = models.DateTimeField(null=True, blank=True, help_text="Empty: valid at once.")
    valid_until = models.DateTimeField(null=True, blank=True, help_text="Empty: never expires.")
    max_calls = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty: unlimited. 0 means no calls at all."
    )
    calls_used = models.IntegerField(default=0)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    allowed_models = models.JSONField(
        default=list, blank=True, help_text='Model names this key may use, e.g. ["echo"]. Empty: all.'
    )
    max_tokens_total = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        help_text="Lifetime token budget (prompt + completion). Empty: unlimited.",
    )
    tokens_used = models.BigIntegerField(default=0)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Rate limits (apikeys.ratelimits, in Redis across every web process); empty: the
    # [limits] default, itself unlimited when absent.
    rpm = models.PositiveIntegerField(
        "requests per minute",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Empty: [limits] rpm.",
    )
    tpm = models.PositiveIntegerField(
        "tokens per minute", null=True, blank=True, validators=[MinValueValidator(1)], help_text="Empty: [limits] tpm."
    )
    max_parallel = models.PositiveIntegerField(
        "requests in flight",
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Calls running or queued at once. Empty: [limits] max_parallel.",
    )
    model_limits = models.JSONField(
        default=dict,
        blank=True,
        help_text='Per-model limits on top of the key\'s, e.g. {"smollm2": {"rpm": 10, "tpm": 5000}}.',
    )
    budgets = models.JSONField(
        default=dict,
        blank=True,
        help_text='Budgets per calendar period ([limits] timezone), e.g. {"daily": {"calls": 1000, '
        '"tokens": 200000}, "monthly": {"spend_usd": 25}}: calls, tokens, spend_usd, device_s per daily, '
        "weekly, monthly. Empty: the [limits] defaults.",
    )
    weight = models.PositiveSmallIntegerField(
        default=1,
        validators=[MinValueValidator(1)],
        help_text="Share of a busy device: a key of weight 2 gets two slots for each one of weight 1.",
    )
    jwt_subject = models.CharField(
        max_length=255,
        unique=True,
        null=True,
        blank=True,
        help_text="JWT 'sub' claim that authenticates as this key ([jwt] in the config). Empty: none.",
    )

    objects = ApiKeyManager()

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix})"

    def save(self, *args, **kwargs) -> None:
        """Saving an existing key writes what it was given, never its counters: a full
        save (no `update_fields`) writes every other column, and counters named in
        `update_fields` are dropped from it."""
        if not self._state.adding:
            fields = kwargs.get("update_fields")
            if fields is None:
                fields = [field.name for field in self._meta.concrete_fields if not field.primary_key]
            kwargs["update_fields"] = [name for name in fields if name not in COUNTERS]
            if not kwargs["update_fields"]:
                return
        super().save(*args, **kwargs)

    def clean(self) -> None:
        """A list of names, nothing else: a bare string would match by substring.
        Per-model limits: model names to positive rpm / tpm / max_parallel."""
        models_list = self.allowed_models
        if not isinstance(models_list, list) or not all(isinstance(m, str) and m for m in models_list):
            raise ValidationError({"allowed_models": 'Give a list of model names, e.g. ["echo"], or [] for all.'})
        if not valid_budgets(self.budgets):
            raise ValidationError(
                {
                    "budgets": 'Give periods and their budgets, e.g. {"daily": {"calls": 100}}; periods are daily, '
                    "weekly and monthly, budgets calls, tokens, spend_usd and device_s, each 0 or more."
                }
            )
        if not valid_model_limits(self.model_limits):
            raise ValidationError(
                {
                    "model_limits": 'Give model names and their limits, e.g. {"smollm2": {"rpm": 10}}; '
                    "limits are rpm, tpm and max_parallel, each a positive integer."
                }
            )

    # DRF treats the authenticated principal as a user.
    is_authenticated = True

    @property
    def calls_left(self) -> int | None:
        if self.max_calls is None:
            return None
        return max(self.max_calls - self.calls_used, 0)

    @property
    def tokens_left(self) -> int | None:
        if self.max_tokens_total is None:
            return None
        return max(self.max_tokens_total - self.tokens_used, 0)

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def status(self, now=None) -> str:
        now = now or timezone.now()
        if self.revoked_at:
            return "revoked"
        if self.valid_from and now < self.valid_from:
            return "not yet valid"
        if self.valid_until and now >= self.valid_until:
            return "expired"
        if self.max_calls is not None and self.calls_used >= self.max_calls:
            return "quota used"
        if self.max_tokens_total is not None and self.tokens_used >= self.max_tokens_total:
            return "tokens used"
        return "active"


class BudgetUse(models.Model):
    """What a key used of its budgets in one calendar period (a day, a week from Monday,
    a month, in `[limits] timezone`): taken as calls are admitted (their reservations)
    and settled as they end, by `apikeys.budgets`, in the admission's own transaction
    so a budget is exact under any concurrency. A new period starts a new row."""

    class Period(models.TextChoices):
        DAILY = "daily"
        WEEKLY = "weekly"
        MONTHLY = "monthly"

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="budget_uses")
    period = models.CharField(max_length=10, choices=Period.choices)
    starts = models.DateField()  # the period's first day
    calls = models.IntegerField(default=0)
    tokens = models.BigIntegerField(default=0)
    # In billionths of a dollar: integer sums are exact on SQLite too (its decimals are floats).
    spend_nano_usd = models.BigIntegerField(default=0)
    device_s = models.FloatField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["api_key", "period", "starts"], name="budget_use_period")]

    @property
    def spend_usd(self) -> float:
        return self.spend_nano_usd / NANO

    def __str__(self) -> str:
        return f"key {self.api_key_id} {self.period} from {self.starts}"
