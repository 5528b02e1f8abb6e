"""Jobs are the usage log: browsable and filterable, never edited by hand."""

from __future__ import annotations

from django.contrib import admin

from llmjobs.models import Job


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "model",
        "status",
        "backend",
        "tries",
        "api_key",
        "queue_wait",
        "run_time",
        "device_s",
        "batch_size",
        "worker",
        "refunded",
    )
    list_filter = ("status", "model", "backend", "refunded")
    search_fields = ("id", "api_key__prefix", "api_key__name", "error_code")
    date_hierarchy = "created_at"
    list_select_related = ("api_key",)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="queue wait (s)")
    def queue_wait(self, obj: Job) -> str:
        return "" if obj.queue_wait_s is None else f"{obj.queue_wait_s:.3f}"

    @admin.display(description="run (s)")
    def run_time(self, obj: Job) -> str:
        return "" if obj.run_s is None else f"{obj.run_s:.3f}"
