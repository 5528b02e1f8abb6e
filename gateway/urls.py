from django.urls import re_path

from gateway import views

# No trailing slash (the SDKs send none); one is tolerated for hand-written clients.
urlpatterns = [
    re_path(r"^v1/models/?$", views.ModelsView.as_view(), name="v1-models"),
    re_path(r"^v1/models/(?P<model_id>[^\s]+?)/?$", views.ModelDetailView.as_view(), name="v1-model"),
    re_path(r"^v1/chat/completions/?$", views.ChatCompletionsView.as_view(), name="v1-chat-completions"),
    re_path(r"^v1/completions/?$", views.CompletionsView.as_view(), name="v1-completions"),
    re_path(r"^v1/embeddings/?$", views.EmbeddingsView.as_view(), name="v1-embeddings"),
    re_path(r"^v1/tokenize/?$", views.TokenizeView.as_view(), name="v1-tokenize"),
    re_path(r"^v1/tokenize/count/?$", views.TokenCountView.as_view(), name="v1-tokenize-count"),
    re_path(r"^extras/tokenize/count/?$", views.TokenCountView.as_view(), name="extras-tokenize-count"),
]
