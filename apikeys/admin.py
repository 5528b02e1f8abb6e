"""Declarative admin for keys: the plaintext appears once, in the message after "add"."""

from __future__ import annotations

from django.contrib import admin, messages
from django.utils.html import format_html

from apikeys import keys, services
from apikeys.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "owner_email", "window", "calls", "key_status", "last_used_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix", "owner_email", "note")
    readonly_fields = ("prefix", "created_at", "calls_used", "revoked_at", "last_used_at")
    fields = (
        "name",
        "owner_email",
        "note",
        "valid_from",
        "valid_until",
        "max_calls",
        "allowed_models",
        "prefix",
        "created_at",
        "calls_used",
        "revoked_at",
        "last_used_at",
    )
    actions = ("revoke", "reset_calls")

    @admin.display(description="valid")
    def window(self, obj: ApiKey) -> str:
        start = obj.valid_from.strftime("%Y-%m-%d %H:%M") if obj.valid_from else "…"
        end = obj.valid_until.strftime("%Y-%m-%d %H:%M") if obj.valid_until else "…"
        return f"{start} → {end}"

    @admin.display(description="calls used / max")
    def calls(self, obj: ApiKey) -> str:
        return f"{obj.calls_used} / {'∞' if obj.max_calls is None else obj.max_calls}"

    @admin.display(description="status")
    def key_status(self, obj: ApiKey) -> str:
        return obj.status()

    def save_model(self, request, obj: ApiKey, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        credentials = keys.new_credentials()
        obj.prefix, obj.secret_hash = credentials.prefix, credentials.secret_hash
        super().save_model(request, obj, form, change)
        messages.warning(
            request,
            format_html(
                "The API key for “{}” is <code>{}</code>. Copy it now: it is not stored and will not be shown again.",
                obj.name,
                credentials.plaintext,
            ),
        )

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset) -> None:
        count = services.revoke_keys(queryset)
        self.message_user(request, f"Revoked {count} key(s).")

    @admin.action(description="Reset calls used to 0")
    def reset_calls(self, request, queryset) -> None:
        count = services.reset_usage(queryset)
        self.message_user(request, f"Reset {count} key(s).")
