"""Declarative admin for keys, and the console on top of it: the plaintext appears
once, in the page after "add"; each key's page charts its usage, and an overview
charts everyone's (`apikeys.console`)."""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.shortcuts import render
from django.urls import path, reverse
from django.utils.cache import patch_cache_control
from django.utils.html import format_html, format_html_join

from apikeys import console, keys, ratelimits, services
from apikeys.models import ApiKey


def model_choices(current: list[str]) -> list[tuple[str, str]]:
    """The configured model names, and any the key allows that the config no longer
    has (kept, marked, so saving the form does not drop them silently)."""
    configured = settings.LLM_CONFIG.model_names
    gone = [(name, f"{name} (not configured)") for name in current if name not in configured]
    return [(name, name) for name in configured] + gone


class ApiKeyForm(forms.ModelForm):
    """`allowed_models` picked from the configured models, not typed as JSON."""

    allowed_models = forms.MultipleChoiceField(
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text="The models this key may use. None ticked: all.",
    )

    class Meta:
        model = ApiKey
        fields = "__all__"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["allowed_models"].choices = model_choices(list(self.instance.allowed_models or []))


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
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
        "limits",
        "usage_charts",
        "usage_by_day",
    )
    fieldsets = (
        (None, {"fields": ("name", "owner_email", "note", "jwt_subject", "prefix", "created_at", "last_used_at")}),
        (
            "Limits",
            {
                "fields": (
                    "limits",
                    "valid_from",
                    "valid_until",
                    "max_calls",
                    "max_tokens_total",
                    "allowed_models",
                    "rpm",
                    "tpm",
                    "max_parallel",
                    "model_limits",
                    "budgets",
                    "weight",
                    "calls_used",
                    "tokens_used",
                    "revoked_at",
                )
            },
        ),
        ("Usage, last 30 days", {"fields": ("usage_charts", "usage_by_day")}),
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

    @admin.display(description="in force")
    def limits(self, obj: ApiKey) -> str:
        """Every limit of the key in one line, as the API enforces it now."""
        if not obj.pk:
            return "-"
        models = ", ".join(obj.allowed_models) if obj.allowed_models else "all models"
        rates = ratelimits.key_limits_text(obj)
        return (
            f"{obj.status()}; calls {self.calls(obj)}; tokens {self.tokens(obj)}; valid {self.window(obj)}; "
            f"{models}; weight {obj.weight}; {rates}"
        )

    @admin.display(description="per day")
    def usage_charts(self, obj: ApiKey) -> str:
        return console.usage_charts(obj.id) if obj.pk else "-"

    @admin.display(description="days with calls")
    def usage_by_day(self, obj: ApiKey) -> str:
        """Calls, tokens, spend and device-seconds per day: what to bill, GPU time included."""
        from llmjobs.usage import usage_by_day

        days = usage_by_day(obj.id)[-30:] if obj.pk else []
        if not days:
            return "no calls yet"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    day["day"],
                    day["calls"],
                    day["failed"],
                    day["prompt_tokens"] + day["completion_tokens"],
                    f"{day['cost_usd']:.4f}",
                    f"{day['device_s']:.3f}",
                )
                for day in reversed(days)
            ),
        )
        return format_html(
            "<table><tr><th>day</th><th>calls</th><th>errors</th><th>tokens</th><th>spend (USD)</th>"
            "<th>device-seconds</th></tr>{}</table>",
            rows,
        )

    @admin.display(description="status")
    def key_status(self, obj: ApiKey) -> str:
        return obj.status()

    def get_urls(self):
        overview = path("usage/", self.admin_site.admin_view(self.usage_overview), name="apikeys_usage")
        return [overview, *super().get_urls()]

    def usage_overview(self, request):
        """Every key's usage: the charts, the top keys and the top models."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            **console.overview_context(),
            "title": "Usage of all keys",
            "timezone": settings.LLM_CONFIG.limits.timezone,
        }
        return render(request, "admin/apikeys/apikey/usage_overview.html", context)

    def save_model(self, request, obj: ApiKey, form, change: bool) -> None:
        if change:
            # Only what the form changed (nothing: no write). The counters move under
            # the admin's feet and are never written by a save (ApiKey.save).
            if form.changed_data:
                obj.save(update_fields=form.changed_data)
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
