"""The Celery app. Jobs are routed per device (llmjobs.routing); results travel on
each job's Redis stream, so there is no result backend."""

import os
import threading

from celery import Celery, bootsteps

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djangollmapi.settings")

app = Celery("djangollmapi")
app.config_from_object("django.conf:settings", namespace="CELERY")

WORKER_SOCKET_TIMEOUT_S = 10.0

# Set while this process's worker consumes its queues: from when its consumer has
# (re)declared them until its broker connection is lost or it shuts down.
consuming = threading.Event()


class Consuming(bootsteps.StartStopStep):
    """A step of the worker's consumer that keeps `consuming` (the device worker's
    heartbeat beats only while it is set). After Redis came back empty, the web tier
    hears of the worker again only once its consumer has reconnected and declared its
    queue anew; a job sent before that would go to no queue at all."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent) -> None:
        consuming.set()

    def stop(self, parent) -> None:
        consuming.clear()

    def shutdown(self, parent) -> None:
        consuming.clear()


def transport_options(worker: bool = False) -> dict:
    """The Redis transport's options. The web tier publishes a job with no retry and
    short socket timeouts: a Redis that is down or frozen fails the call (a 503)
    within `REDIS_SOCKET_TIMEOUT_S`, never a hang. A worker process (`worker`) waits
    longer on each command, and its consumer reconnects by itself when Redis is back
    (`broker_connection_retry`, on by default)."""
    from django.conf import settings

    timeout_s = WORKER_SOCKET_TIMEOUT_S if worker else settings.REDIS_SOCKET_TIMEOUT_S
    options = {
        # Above the hard limit: an unacked job is redelivered only if its worker died
        # (a live worker that held it longer drops the duplicate; its supervisor puts a
        # dead process's messages back at once).
        "visibility_timeout": settings.LLM_CONFIG.worker.visibility_timeout_s,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry_on_timeout": False,
    }
    if not worker:
        options["max_retries"] = 0  # connecting to publish: one try, not kombu's retries
    return options


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
        broker_transport_options=transport_options(),
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=True,
        task_publish_retry=False,
    )


app.on_after_configure.connect(lambda sender, **kwargs: configure(sender), weak=False)
app.steps["consumer"].add(Consuming)
app.autodiscover_tasks(["llmjobs"])
