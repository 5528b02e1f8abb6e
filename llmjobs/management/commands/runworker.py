"""`manage.py runworker <device>`: the one worker for one device.

Two processes: a supervisor (this command, which never touches the device) and the
worker process it keeps alive (`--child`): Celery with task threads that hold the
device's jobs, and the device loop that runs them (`llmjobs.device`)."""

from __future__ import annotations

import os
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from djangollmapi.celery import app as celery_app
from djangollmapi.celery import transport_options
from djangollmapi.config import DEVICE_PATTERN
from djangollmapi.processes import manage_argv
from llmjobs import runtime, supervisor
from llmjobs.routing import device_queue_name


def node_name(device: str) -> str:
    """The worker's Celery node name, also what a job's `worker` column records:
    `<queue>@<node>`, the node being `[worker] node` (env `DLA_NODE`) or the hostname,
    so that workers of one device name on several hosts are told apart."""
    return runtime.this_worker(device)


def worker_argv(device: str, loglevel: str, node: str) -> list[str]:
    """Task threads, as many as the jobs the device may hold (`[worker] max_held`),
    each message unacknowledged until its job ends (acks late), none prefetched
    beyond them. The device itself is only touched by the device loop's thread.
    Time limits travel with each job and are enforced by the loop's watchdog."""
    held = settings.LLM_CONFIG.worker.max_held
    return [
        "worker",
        f"--queues={device_queue_name(device)}",
        f"--hostname={node}",
        "--pool=threads",
        f"--concurrency={held}",
        "--prefetch-multiplier=1",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        f"--loglevel={loglevel}",
    ]


class Command(BaseCommand):
    help = "Start the worker for one device (e.g. cpu, cuda:0), supervised."

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
        parser.add_argument("--child", action="store_true", help="(internal) be the worker process itself")

    def handle(self, *args, device: str, preload: bool | None, loglevel: str, child: bool, **opts) -> None:
        if not DEVICE_PATTERN.match(device):
            raise CommandError(f"{device!r} is not cpu, cpu:N, cuda:N or mps")
        served = settings.LLM_CONFIG.deployments_on(device)
        if not served:
            configured = ", ".join(settings.LLM_CONFIG.devices)
            raise CommandError(f"no deployment uses device {device!r} (configured: {configured})")
        if preload is None:
            preload = settings.LLM_CONFIG.worker.preload
        node = node_name(device)
        if child:
            self.run_worker_process(device, preload, loglevel, node)
            return
        names = ", ".join(d.name for d in served)
        self.stdout.write(f"worker for {device} (queue {device_queue_name(device)}, as {node}): {names}")
        self.stdout.flush()
        argv = [*manage_argv("runworker", device, "--loglevel", loglevel, "--child")]
        argv.append("--preload" if preload else "--no-preload")
        status = supervisor.supervise(argv, node, device_queue_name(device), self.say)
        sys.exit(status if status > 0 else 0)

    def run_worker_process(self, device: str, preload: bool, loglevel: str, node: str) -> None:
        os.environ[runtime.DEVICE_ENV] = device
        # The worker's broker connection: longer socket timeouts than the web's publish.
        celery_app.conf.broker_transport_options = transport_options(worker=True)
        runtime.start_device(device, preload)
        celery_app.worker_main(worker_argv(device, loglevel, node))

    def say(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
