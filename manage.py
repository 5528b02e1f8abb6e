#!/usr/bin/env python
"""Django's command-line utility: serve, runworker, createapikey, preparemodels, ..."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangollmapi.settings")
    from django.core.management import execute_from_command_line

    from djangollmapi.config import ConfigError

    try:
        execute_from_command_line(sys.argv)
    except ConfigError as exc:
        sys.exit(f"djangollmapi: configuration error: {exc}")


if __name__ == "__main__":
    main()
