from django.apps import AppConfig


class AlgorithmsConfig(AppConfig):
    """Installed only for the ``preparemodels`` management command; the app has no models."""

    name = "algorithms"
    verbose_name = "Algorithms"
