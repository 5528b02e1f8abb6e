"""djangollmapi: a self-hosted LLM API server (Django + Celery + transformers)."""

from djangollmapi.celery import app as celery_app

__all__ = ["celery_app"]
