"""Declarative admin for keys: the plaintext appears once, in the message after "add"."""

from __future__ import annotations

from django.contrib import admin
from django.shortcuts import render
from django.urls import reverse
from django.utils.cache import patch_cache_control
from django.utils.html import format_html, format_html_join

from apikeys import keys, services
from apikeys.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "owner_email", "window", "calls", "tokens", "key_status", "last_used_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "prefix", "owner_email", "note", "jwt_subject")
    readonly_fields = (
        "prefix",
        "created_at",
        "calls_used",
        "tokens_used",
        "revoked_at",
        "last_used_at",
        "usage_by_day",
    )
    fields = (
        "name",
        "owner_email",
        "note",
        "valid_from",
        "valid_until",
        "max_calls",
        "max_tokens_total",
        "allowed_models",
        "weight",
        "jwt_subject",
        *readonly_fields,
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

    @admin.display(description="tokens used / max")
    def tokens(self, obj: ApiKey) -> str:
        return f"{obj.tokens_used} / {'∞' if obj.max_tokens_total is None else obj.max_tokens_total}"

    @admin.display(description="usage, last 30 days")
    def usage_by_day(self, obj: ApiKey) -> str:
        """Calls, tokens, spend and device-seconds per day: what to bill, GPU time included."""
        from llmjobs.selectors import usage_by_day

        days = usage_by_day(obj.id)[-30:] if obj.pk else []
        if not days:
            return "no calls yet"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    day["day"],
                    day["calls"],
                    (day["prompt_tokens"] or 0) + (day["completion_tokens"] or 0),
                    "" if day["cost_usd"] is None else f"{day['cost_usd']:.4f}",
                    "" if day["device_s"] is None else f"{day['device_s']:.3f}",
                )
                for day in reversed(days)
            ),
        )
        return format_html(
            "<table><tr><th>day</th><th>calls</th><th>tokens</th><th>spend (USD)</th><th>device-seconds</th></tr>"
            "{}</table>",
            rows,
        )

    @admin.display(description="status")
    def key_status(self, obj: ApiKey) -> str:
        return obj.status()

    def save_model(self, request, obj: ApiKey, form, change: bool) -> None:
        if change:
            # Only what the form changed: calls_used, tokens_used and revoked_at move under the admin's
            # feet (calls in flight, a revoke elsewhere) and must not be written back.
            obj.save(update_fields=form.changed_data or None)
            return
        credentials = keys.new_credentials()
        obj.prefix, obj.secret_hash = credentials.prefix, credentials.secret_hash
        obj.save()
        request._new_api_key = credentials.plaintext

    def response_add(self, request, obj: ApiKey, post_url_continue=None):
        """Show the key on this response alone: not in a message (the default storage
        is a cookie, so the key would travel in a header), never cached."""
        response = render(
            request,
            "admin/apikeys/apikey/key_created.html",
            {
                **self.admin_site.each_context(request),
                "api_key": obj,
                "plaintext": request._new_api_key,
                "changelist_url": reverse("admin:apikeys_apikey_changelist"),
                "title": "API key created",
            },
        )
        patch_cache_control(response, no_store=True)
        return response

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset) -> None:
        count = services.revoke_keys(queryset)
        self.message_user(request, f"Revoked {count} key(s).")

    @admin.action(description="Reset calls and tokens used to 0")
    def reset_calls(self, request, queryset) -> None:
        count = services.reset_usage(queryset)
        self.message_user(request, f"Reset {count} key(s).")
