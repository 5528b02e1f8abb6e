"""`manage.py serve`: everything the config in force needs, in one foreground command.

Embedded Redis (when no Redis URL is configured), migrations, one worker per device,
gunicorn; with `--demo` also an admin user and a demo key printed with a curl line.
Ctrl-C (or SIGTERM) stops every process it started.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.request

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from apikeys.models import ApiKey
from djangollmapi import metrics, processes
from djangollmapi.config import ServerConfig
from llmjobs import events
from llmjobs.routing import device_queue_name

READY_TIMEOUT_S = 300


class Stop(Exception):
    """Raised from the signal handler to unwind into the clean-up path."""


def raise_stop(signum, frame) -> None:
    raise Stop()


class Command(BaseCommand):
    help = "Run the whole server for the config in force: Redis (embedded), workers, web."

    def add_arguments(self, parser) -> None:
        config = settings.LLM_CONFIG.server
        parser.add_argument("--host", default=config.host)
        parser.add_argument("--port", type=int, default=config.port)
        parser.add_argument("--demo", action="store_true", help="create an admin user and a demo key, print them")

    def handle(self, *args, host: str, port: int, demo: bool, **opts) -> None:
        server = settings.LLM_CONFIG.server.model_copy(update={"host": host, "port": port})
        self.children: list[tuple[str, subprocess.Popen]] = []
        # Set explicitly: a shell that starts us in the background hands down SIGINT
        # ignored, and Ctrl-C, kill and a closed terminal must all stop everything.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, raise_stop)
        try:
            self.start_everything(server, demo)
            self.watch_children()
        except Stop:
            self.stdout.write("\nstopping ...")
        finally:
            self.stop_children()

    def start_everything(self, server: ServerConfig, demo: bool) -> None:
        config = settings.LLM_CONFIG
        logs = config.server.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout.write(f"config: {config.source}; data dir: {config.server.data_dir}")
        metrics.clear_metrics_dir(settings.METRICS_DIR)
        if config.embedded_redis:
            self.stdout.write(f"starting embedded Redis on {config.redis_socket}")
            self.children.append(("redis", processes.start_embedded_redis(config.redis_socket, logs / "redis.log")))
        call_command("migrate", interactive=False, verbosity=0)
        for device in config.devices:
            log_path = logs / f"worker-{device.replace(':', '-')}.log"
            self.stdout.write(f"starting worker for {device} (log: {log_path})")
            self.children.append(
                (f"worker {device}", processes.spawn(processes.manage_argv("runworker", device), log_path=log_path))
            )
        argv = processes.gunicorn_argv(server)
        self.children.append(("web", processes.spawn(argv, log_path=logs / "web.log")))
        self.wait_until_ready(server.base_url)
        if demo:
            self.print_demo(server.base_url)
        self.stdout.write(self.style.SUCCESS(f"serving on {server.base_url} (logs in {logs}); Ctrl-C stops everything"))

    def wait_until_ready(self, base_url: str) -> None:
        """Wait for each device's worker heartbeat (its models are loaded) and the web port."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = set(settings.LLM_CONFIG.devices)
        self.stdout.write("waiting for workers to load their models ...")
        while pending:
            self.check_children()
            pending = {d for d in pending if not events.worker_alive(d)}
            if time.monotonic() > deadline:
                raise CommandError(f"workers not ready after {READY_TIMEOUT_S} s: {', '.join(sorted(pending))}")
            time.sleep(0.2)
        self.report_failed_models()
        url = f"{base_url}/api/usage/"
        while True:
            self.check_children()
            try:
                urllib.request.urlopen(url, timeout=2)
            except urllib.error.HTTPError:
                return  # 401 without a key: the web tier is up
            except OSError:
                if time.monotonic() > deadline:
                    raise CommandError("the web server did not come up") from None
                time.sleep(0.2)

    def report_failed_models(self) -> None:
        """Say at start which models did not load (their calls get 503 model_unavailable)."""
        for device in settings.LLM_CONFIG.devices:
            models = events.queue_state(device_queue_name(device)).models
            for name, load in sorted(models.items()):
                if load.get("state") == "failed":
                    self.stderr.write(f"model {name!r} on {device} failed to load: {load.get('error', '')}")

    def print_demo(self, base_url: str) -> None:
        password = self.ensure_admin()
        _key, plaintext = ApiKey.objects.issue(name="demo", note="created by serve --demo")
        model = settings.LLM_CONFIG.server.default_model
        self.stdout.write("")
        self.stdout.write(
            f"admin:    {base_url}/admin/  user 'admin'  "
            + (
                f"password {password}"
                if password
                else "(password set earlier; reset with: manage.py changepassword admin)"
            )
        )
        self.stdout.write(f"demo key: {plaintext}")
        self.stdout.write(f"model:    {model} (default)")
        self.stdout.write("try:")
        self.stdout.write(
            f"  curl -s {base_url}/api/ -H 'Authorization: Bearer {plaintext}' "
            "-H 'Content-Type: application/json' -d '{\"text\": \"What is the capital of France?\"}'"
        )
        chat = {"model": model, "stream": True, "messages": [{"role": "user", "content": "Name three colours."}]}
        self.stdout.write(f"or, OpenAI-compatible and streamed (any OpenAI SDK works with base_url={base_url}/v1):")
        self.stdout.write(
            f"  curl -sN {base_url}/v1/chat/completions -H 'Authorization: Bearer {plaintext}' "
            f"-H 'Content-Type: application/json' -d '{json.dumps(chat)}'"
        )
        self.stdout.write("")

    def ensure_admin(self) -> str | None:
        """Create the admin user once; its password is shown only then."""
        User = get_user_model()
        if User.objects.filter(username="admin").exists():
            return None
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", "", password)
        return password

    def check_children(self) -> None:
        for name, process in self.children:
            if process.poll() is not None:
                raise CommandError(f"{name} exited with status {process.returncode}; see its log")

    def watch_children(self) -> None:
        while True:
            self.check_children()
            time.sleep(0.5)

    def stop_children(self) -> None:
        for name, process in reversed(self.children):
            processes.stop(process)
            self.stdout.write(f"stopped {name}")
        sys.stdout.flush()
