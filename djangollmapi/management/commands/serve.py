"""`manage.py serve`: everything the config in force needs, in one foreground command.

Embedded Redis (when no Redis URL is configured), migrations, one worker per device,
gunicorn; with `--demo` also an admin user and a demo key printed with a curl line.

Once everything is ready, a child that dies is started again with a backoff
(`djangollmapi.supervision`), and serve says so; one that dies before that aborts the
start. Ctrl-C (or SIGTERM) stops every process it started, in an order that lets
calls in flight end: the web server first (its requests get gunicorn's graceful
timeout), then the workers (a warm shutdown: their jobs finish), then Redis.
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
from djangollmapi.supervision import Child
from llmjobs import events, supervisor
from llmjobs.management.commands.runworker import node_name
from llmjobs.routing import device_queue_name

READY_TIMEOUT_S = 300
WATCH_INTERVAL_S = 0.2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SERVER_STOPPED = "The server stopped before this job ended."


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
        self.children: list[Child] = []
        # Set explicitly: a shell that starts us in the background hands down SIGINT
        # ignored, and Ctrl-C, kill and a closed terminal must all stop everything.
        for signum in STOP_SIGNALS:
            signal.signal(signum, raise_stop)
        try:
            self.start_everything(server, demo)
            self.watch_children()
        except Stop:
            self.say("\nstopping ...")
        finally:
            for signum in STOP_SIGNALS:  # a second Ctrl-C must not cut the orderly stop short
                signal.signal(signum, signal.SIG_IGN)
            self.stop_children()

    def start_everything(self, server: ServerConfig, demo: bool) -> None:
        config = settings.LLM_CONFIG
        logs = config.server.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout.write(f"config: {config.source}; data dir: {config.server.data_dir}")
        metrics.clear_metrics_dir(settings.METRICS_DIR)
        if config.embedded_redis:
            self.stdout.write(f"starting embedded Redis on {config.redis_socket}")
            redis = self.launch(
                Child("redis", lambda: processes.spawn_embedded_redis(config.redis_socket, logs / "redis.log"))
            )
            processes.wait_for_redis(config.redis_client_url, redis)
        call_command("migrate", interactive=False, verbosity=0)
        for device in config.devices:
            log_path = logs / f"worker-{device.replace(':', '-')}.log"
            self.stdout.write(f"starting worker for {device} (log: {log_path})")
            argv = processes.manage_argv("runworker", device)
            self.launch(
                Child(
                    f"worker {device}",
                    lambda argv=argv, log_path=log_path: processes.spawn(argv, log_path=log_path),
                    wait_for_group=True,  # one worker process per device, never two at once
                    before_restart=lambda device=device: self.recover_worker(device),
                )
            )
        argv = processes.gunicorn_argv(server)
        self.launch(Child("web", lambda: processes.spawn(argv, log_path=logs / "web.log")))
        self.wait_until_ready(server.base_url)
        if demo:
            self.print_demo(server.base_url)
        self.stdout.write(self.style.SUCCESS(f"serving on {server.base_url} (logs in {logs}); Ctrl-C stops everything"))
        self.stdout.flush()

    def launch(self, child: Child) -> subprocess.Popen:
        self.children.append(child)
        return child.launch()

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
        """Before everything is ready: a child that died aborts the start."""
        for child in self.children:
            status = child.exited()
            if status is not None:
                raise CommandError(f"{child.name} exited with status {status}; see its log")

    def watch_children(self) -> None:
        """Once ready: restart whatever dies, after its backoff."""
        while True:
            for child in self.children:
                child.watch(self.say)
            time.sleep(WATCH_INTERVAL_S)

    def recover_worker(self, device: str) -> None:
        """Before a device's worker starts again: what its dead worker process left
        (jobs it ran fail, refunded; messages it held go back to the queue), as
        `runworker` does when only its worker process died."""
        try:
            failed, requeued = supervisor.recover(node_name(device), device_queue_name(device))
        except Exception as exc:  # Redis or the database down too: restart it anyway
            self.say(f"could not clean up after the worker for {device}: {type(exc).__name__}: {exc}")
            return
        if failed or requeued:
            self.say(f"worker for {device}: {failed} running job(s) failed, {requeued} held message(s) requeued")

    def stop_children(self) -> None:
        """The web server first (its requests get gunicorn's graceful timeout), the
        workers next (a warm shutdown finishes their jobs), Redis last."""
        for child in reversed(self.children):
            if child.name == "redis":
                self.fail_unfinished_jobs()
            child.stop()
            self.say(f"stopped {child.name}")
        sys.stdout.flush()

    def fail_unfinished_jobs(self) -> None:
        """With the embedded Redis, a local job still queued or running once the
        workers stopped can never end: its queue and its events go with this Redis.
        It fails, refunded, so none is left active."""
        queues = [device_queue_name(device) for device in settings.LLM_CONFIG.devices]
        try:
            failed = supervisor.fail_unfinished_jobs(queues, SERVER_STOPPED)
        except Exception as exc:
            self.say(f"could not fail the jobs left unfinished: {type(exc).__name__}: {exc}")
            return
        if failed:
            self.say(f"{failed} unfinished job(s) failed and refunded: the server stopped before they ended")

    def say(self, line: str) -> None:
        self.stdout.write(line)
        self.stdout.flush()
