"""The request body parser for every API view."""

from __future__ import annotations

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


class StrictJSONParser(JSONParser):
    """DRF's JSON parser turns only ValueError into a 400. Deeply nested JSON
    (RecursionError) or a `charset` that names a non-text codec (rot13, zlib, bz2)
    escaped as 500s; every failure to read the body is the client's 400."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except ParseError:
            raise
        except (Exception, RecursionError) as exc:
            raise ParseError("JSON parse error") from exc
