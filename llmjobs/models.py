"""One row per call, local or upstream: the job and the usage record at once."""

from __future__ import annotations

import uuid

from django.db import models
from django.utils import timezone

from llmjobs.routing import queue_device


class Job(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Kind(models.TextChoices):
        """What the job asks of the model: which endpoint made it, and which method of
        the algorithm runs it (llmjobs.runtime)."""

        RUN = "run"  # POST /api/: Algorithm.run
        CHAT = "chat"  # /v1/chat/completions
        COMPLETION = "completion"  # /v1/completions
        EMBEDDINGS = "embeddings"  # /v1/embeddings
        TOKENIZE = "tokenize"  # /v1/tokenize and the count endpoints

    ACTIVE = (Status.QUEUED, Status.RUNNING)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    api_key = models.ForeignKey("apikeys.ApiKey", null=True, on_delete=models.SET_NULL, related_name="jobs")
    model = models.CharField(max_length=100)
    backend = models.CharField(max_length=20, default="local")  # the one that served it, or was tried last
    # The backends tried for it, this one included: more than 1 when a route's earlier
    # ones failed before their answer started (gateway.fallbacks); 0 when none could be.
    tries = models.PositiveSmallIntegerField(default=1)
    queue = models.CharField(max_length=100, blank=True)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.RUN)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    input_text = models.TextField(blank=True)
    output = models.JSONField(null=True, blank=True)
    error_code = models.CharField(max_length=50, blank=True)
    error_message = models.TextField(blank=True)
    input_chars = models.PositiveIntegerField(default=0)
    output_chars = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    refunded = models.BooleanField(default=False)
    # Token budget: reserved from the key at dispatch, corrected once to what was used.
    tokens_reserved = models.PositiveIntegerField(default=0)
    tokens_settled = models.BooleanField(default=False)
    # Upstream calls with a configured price: what the provider will bill, in USD.
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, null=True, blank=True)
    # Local jobs: the device-seconds the job used (its share of every step it was in)
    # and the most jobs it shared a step with, so GPU time can be billed or capped.
    device_s = models.FloatField(null=True, blank=True)
    batch_size = models.PositiveSmallIntegerField(null=True, blank=True)
    # Admitted under rate limits (apikeys.ratelimits): its ending settles them in Redis.
    rate_limited = models.BooleanField(default=False)
    # Admitted under period budgets (apikeys.budgets), with this much spend reserved:
    # its ending replaces the reservation by what it used.
    budgeted = models.BooleanField(default=False)
    spend_reserved = models.DecimalField(max_digits=14, decimal_places=8, default=0)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["api_key", "created_at"]),
            models.Index(fields=["queue", "status", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.model} {self.status} {self.id}"

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    @property
    def device(self) -> str:
        """The device whose queue a local job went to ("" for other jobs): with
        replicas, the one it was sent to (or moved to, its first worker gone)."""
        return queue_device(self.queue) if self.queue else ""

    @property
    def queue_wait_s(self) -> float | None:
        if not self.started_at:
            return None
        return (self.started_at - self.created_at).total_seconds()

    @property
    def run_s(self) -> float | None:
        if not (self.started_at and self.finished_at):
            return None
        return (self.finished_at - self.started_at).total_seconds()


class UsageDay(models.Model):
    """One key's use of one model on one calendar day ([limits] timezone): what the
    console and `/api/usage/` read, so they stay fast with millions of jobs. Kept by
    `llmjobs.lifecycle` in the transaction that ends each job (`llmjobs.rollups`),
    counted on the day the call was made; it outlives the Job rows (`prunejobs`)."""

    day = models.DateField()
    api_key = models.ForeignKey("apikeys.ApiKey", null=True, on_delete=models.SET_NULL, related_name="usage_days")
    model = models.CharField(max_length=100)
    requests = models.PositiveIntegerField(default=0)  # ended calls, refunded ones included
    succeeded = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    cancelled = models.PositiveIntegerField(default=0)
    refunded = models.PositiveIntegerField(default=0)
    input_chars = models.PositiveBigIntegerField(default=0)
    output_chars = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    cost_usd = models.DecimalField(max_digits=18, decimal_places=8, default=0)
    device_s = models.FloatField(default=0)

    class Meta:
        ordering = ["-day"]
        # Its index also serves the console's range scans by day (its first column).
        constraints = [models.UniqueConstraint(fields=["day", "api_key", "model"], name="usage_day_key_model")]

    def __str__(self) -> str:
        return f"{self.day} {self.model} key {self.api_key_id}"

    @property
    def calls(self) -> int:
        """What the key was charged: its calls less the refunded ones."""
        return self.requests - self.refunded

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
