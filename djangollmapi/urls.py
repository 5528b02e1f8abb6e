from django.contrib import admin
from django.urls import include, path

from djangollmapi import apidocs, health, metrics

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics.metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    # The OpenAPI schema and Swagger UI: no key needed, every asset served from here.
    path("api/schema/", apidocs.schema_view, name="schema"),
    path("api/docs/", apidocs.docs_view, name="api-docs"),
    path("", include("llmjobs.urls")),
    path("", include("gateway.urls")),
]

handler400 = "djangollmapi.errors.bad_request_view"
handler403 = "djangollmapi.errors.permission_denied_view"
handler404 = "djangollmapi.errors.not_found_view"
handler500 = "djangollmapi.errors.server_error_view"
