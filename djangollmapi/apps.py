from django.apps import AppConfig


class DjangoLlmApiConfig(AppConfig):
    """The project package as an app, so it can own the `serve` command."""

    name = "djangollmapi"
    verbose_name = "djangollmapi"
