"""The Celery app. Jobs are routed per device (llmjobs.routing); results travel on
each job's Redis stream, so there is no result backend."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangollmapi.settings")

app = Celery("djangollmapi")
app.config_from_object("django.conf:settings", namespace="CELERY")


def configure(app: Celery) -> None:
    from django.conf import settings

    worker = settings.LLM_CONFIG.worker
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_time_limit=worker.time_limit_s,
        task_soft_time_limit=worker.soft_time_limit_s,
        # Above the hard limit: an unacked job is redelivered only if its worker died
        # (a live worker that held it longer drops the duplicate; its supervisor puts a
        # dead process's messages back at once).
        broker_transport_options={"visibility_timeout": worker.visibility_timeout_s},
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=True,
        task_publish_retry=False,
    )


app.on_after_configure.connect(lambda sender, **kwargs: configure(sender), weak=False)
app.autodiscover_tasks(["llmjobs"])
