"""The two kinds of API view, by when their caller is checked: one that takes calls
checks the key in its admission, after the method; one that reads the caller's own
key, jobs or models checks it first. (Kept apart from the authentication class, which
DRF's settings name: APIView reads them when it is defined.)"""

from __future__ import annotations

from rest_framework.views import APIView


class CallView(APIView):
    """A view that takes calls (`/api/`, chat, completions, embeddings, tokenize): the
    caller is authenticated when the handler first reads `request.auth` (admission), so
    a method the view does not serve is a 405, and OPTIONS answers, whatever the key."""

    def perform_authentication(self, request) -> None:
        return None  # lazily, on the handler's first `request.auth`


class KeyView(APIView):
    """A view that takes no call but shows the caller its own key, jobs or models: the
    key is verified before anything else, so a revoked or expired key is refused
    whatever the method."""

    def initial(self, request, *args, **kwargs) -> None:
        super().initial(request, *args, **kwargs)
        request.auth.key()
