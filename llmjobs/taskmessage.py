"""The run-job message, built and pushed onto its device's queue in one Redis call.

`celery_app.send_task` took ~0.5 ms of the web process's CPU per local call (a third
of what `POST /api/` costs it): a producer from the pool, routing, `saferepr` of every
argument, kombu's channel and its bindings lookup. Every job goes the same way (one
task, the default exchange, a queue named for the device, priority 0), so the message
is Celery's task protocol 2 exactly as kombu's Redis transport stores it (a JSON
envelope with the base64 body), and publishing is the `LPUSH` that transport makes
for it; the worker reads it as any other Celery message.

One difference on purpose: `argsrepr` / `kwargsrepr` (what Celery's logs and
monitoring show of a task) name the job and the model, never the prompt, which the
default repr would have copied into every worker log line that shows the task.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

import redis

RUN_TASK = "llmjobs.run_job"
# What a publisher's own reply queue is called in Celery's messages (unused by us:
# the task ignores its result), one per process as Celery's `thread_oid` is.
REPLY_TO = str(uuid.uuid4())
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


HOST = socket.gethostname()  # once, as Celery does, not a system call per message


def origin() -> str:
    """Who sent it, as Celery says it: `gen<pid>@<host>` (the pid after any fork)."""
    return f"gen{os.getpid()}@{HOST}"


def run_job_message(
    job_id: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    queue: str,
    time_limits: tuple[float | None, float | None],
) -> bytes:
    """The message for `llmjobs.run_job(*args, **kwargs)` with `job_id` as its task id;
    `time_limits` is (soft, hard) as the deployment sets them."""
    soft, hard = time_limits
    body = json.dumps([list(args), kwargs, EMBED], separators=(",", ":")).encode()
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": RUN_TASK,
            "id": job_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [hard, soft],
            "root_id": job_id,
            "parent_id": None,
            "argsrepr": f"({job_id!r}, {args[1]!r}, {args[2]!r}, ...)",
            "kwargsrepr": repr(kwargs),
            "origin": origin(),
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": job_id,
            "reply_to": REPLY_TO,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def publish(client: redis.Redis, queue: str, message: bytes) -> None:
    """Onto the queue's list, where the worker's BRPOP takes it (kombu's Redis
    transport: the default exchange routes to the queue of the routing key's name, and
    priority 0 is the list of the queue's own name)."""
    client.lpush(queue, message)
