"""How an API view picks its renderer from the request's `Accept` header."""

from __future__ import annotations

from rest_framework.exceptions import NotAcceptable
from rest_framework.negotiation import DefaultContentNegotiation


class AnswerWhateverIsAccepted(DefaultContentNegotiation):
    """DRF's negotiation, without its 406: the API answers JSON (or an event stream)
    whatever `Accept` says, as OpenAI does. SSE clients send `Accept: text/event-stream`
    for a stream and browsers `text/html`; DRF refused both before the view ran. A
    header that does name one of a view's renderers still picks it (the schema's
    YAML or JSON)."""

    def select_renderer(self, request, renderers, format_suffix=None):
        try:
            return super().select_renderer(request, renderers, format_suffix)
        except NotAcceptable:
            return renderers[0], renderers[0].media_type
