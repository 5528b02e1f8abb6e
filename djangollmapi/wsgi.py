"""WSGI entry point for gunicorn (gthread workers; DESIGN.md says why)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangollmapi.settings")
application = get_wsgi_application()
