"""`manage.py runworker <device>`: the one worker for one device, with the flags that
make a GPU run one job at a time and never lose one."""

from __future__ import annotations

import os
import re

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from djangollmapi.celery import app as celery_app
from djangollmapi.config import DEVICE_PATTERN
from llmjobs import runtime
from llmjobs.routing import device_queue_name


def worker_argv(device: str, loglevel: str) -> list[str]:
    """Concurrency 1 and prefetch 1: the device holds one job and reserves no other.
    Prefork keeps the model in a child process, so the parent never touches CUDA and a
    hard time limit can kill a wedged job without killing the worker."""
    queue = device_queue_name(device)
    worker = settings.LLM_CONFIG.worker
    node = re.sub(r"[^A-Za-z0-9.-]", "-", queue)
    return [
        "worker",
        f"--queues={queue}",
        f"--hostname={node}@%h",
        "--pool=prefork",
        "--concurrency=1",
        "--prefetch-multiplier=1",
        "--optimization=fair",
        f"--time-limit={worker.time_limit_s:g}",
        f"--soft-time-limit={worker.soft_time_limit_s:g}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        f"--loglevel={loglevel}",
    ]


class Command(BaseCommand):
    help = "Start the single-concurrency Celery worker for one device (e.g. cpu, cuda:0)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("device", help="cpu, cpu:N, cuda:N or mps")
        parser.add_argument(
            "--preload",
            dest="preload",
            action="store_true",
            default=None,
            help="load the device's models at start (default: [worker] preload)",
        )
        parser.add_argument("--no-preload", dest="preload", action="store_false")
        parser.add_argument("--loglevel", default="INFO")

    def handle(self, *args, device: str, preload: bool | None, loglevel: str, **opts) -> None:
        if not DEVICE_PATTERN.match(device):
            raise CommandError(f"{device!r} is not cpu, cpu:N, cuda:N or mps")
        served = settings.LLM_CONFIG.deployments_on(device)
        if not served:
            configured = ", ".join(settings.LLM_CONFIG.devices)
            raise CommandError(f"no deployment uses device {device!r} (configured: {configured})")
        if preload is None:
            preload = settings.LLM_CONFIG.worker.preload
        os.environ[runtime.DEVICE_ENV] = device
        os.environ[runtime.PRELOAD_ENV] = "1" if preload else "0"
        names = ", ".join(d.name for d in served)
        self.stdout.write(f"worker for {device} (queue {device_queue_name(device)}): {names}")
        celery_app.worker_main(worker_argv(device, loglevel))
