"""The API's description, served without a key: the OpenAPI schema (`/api/schema/`,
built as djangollmapi.openapi says) and Swagger UI (`/api/docs/`), whose scripts and
styles are this server's static files (drf-spectacular-sidecar), never a CDN's."""

from __future__ import annotations

import functools
from typing import Any

from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.response import Response


@functools.cache
def public_schema() -> dict[str, Any]:
    """The schema, generated once per process: it follows from the code and the config
    alone, and generating it (~50 ms here) is too much to spend on every keyless GET."""
    return SchemaGenerator().get_schema(request=None, public=True)


class SchemaView(SpectacularAPIView):
    """`GET /api/schema/`: YAML, or JSON for `Accept: application/vnd.oai.openapi+json`
    (or `application/json`, or `?format=json`)."""

    @extend_schema(exclude=True)
    def get(self, request, *args, **kwargs) -> Response:
        return Response(public_schema())


schema_view = SchemaView.as_view()
docs_view = SpectacularSwaggerView.as_view(url_name="schema")
