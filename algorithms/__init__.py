"""Algorithm plug-ins: the contract, the loader and the built-in algorithms.

This package runs inside Celery worker processes, so it never imports Django models;
it is an installed app only so that ``manage.py preparemodels`` is found.
"""
