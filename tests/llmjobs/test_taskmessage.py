"""The run-job message we push ourselves is the message Celery's `send_task` pushes:
the same envelope, headers, routing and body on the suite's Redis, so a Celery or
kombu upgrade that changes its wire format fails here, not in a worker. (That a worker
runs it is what every live test of a local model shows.)"""

from __future__ import annotations

import base64
import json
import uuid

from djangollmapi.celery import app as celery_app
from llmjobs import taskmessage

# What differs between two sends of the same task by nature, or on purpose (argsrepr).
PER_SEND = {"origin", "argsrepr", "kwargsrepr"}
PER_PUBLISHER = {"delivery_tag", "reply_to"}


def decoded(raw: bytes | str) -> tuple[dict, list]:
    message = json.loads(raw)
    return message, json.loads(base64.b64decode(message["body"]))


def test_our_message_is_the_one_send_task_would_push(redis_server):
    queue, job_id = f"dla.test.{uuid.uuid4().hex[:8]}", str(uuid.uuid4())
    args = (job_id, "echo", "chat", {"messages": [{"role": "user", "content": "hé, a secret prompt"}]})
    kwargs = {"key": 7, "weight": 2, "sent": 1700000000.25}
    celery_app.send_task(
        taskmessage.RUN_TASK,
        args=args,
        kwargs=kwargs,
        task_id=job_id,
        queue=queue,
        soft_time_limit=30.0,
        time_limit=40.0,
        retry=False,
        ignore_result=True,
    )
    taskmessage.publish(redis_server, queue, taskmessage.run_job_message(job_id, args, kwargs, queue, (30.0, 40.0)))

    celery_raw, our_raw = redis_server.rpop(queue, 2)  # the oldest first: Celery's
    (celery_message, celery_body), (our_message, our_body) = decoded(celery_raw), decoded(our_raw)
    assert our_body == celery_body
    assert {k: v for k, v in our_message.items() if k not in ("headers", "properties", "body")} == {
        k: v for k, v in celery_message.items() if k not in ("headers", "properties", "body")
    }
    assert set(our_message["headers"]) == set(celery_message["headers"])
    for name in set(celery_message["headers"]) - PER_SEND:
        assert our_message["headers"][name] == celery_message["headers"][name], name
    assert set(our_message["properties"]) == set(celery_message["properties"])
    for name in set(celery_message["properties"]) - PER_PUBLISHER:
        assert our_message["properties"][name] == celery_message["properties"][name], name
    assert redis_server.llen(queue) == 0


def test_what_logs_show_of_the_task_never_holds_the_prompt():
    args = ("j1", "echo", "run", {"text": "my secret prompt"})
    message = json.loads(taskmessage.run_job_message("j1", args, {"key": 1}, "q", (None, None)))
    shown = message["headers"]["argsrepr"] + message["headers"]["kwargsrepr"]
    assert "secret" not in shown
    assert "'j1'" in shown and "'echo'" in shown
