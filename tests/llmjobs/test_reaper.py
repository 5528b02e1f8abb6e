"""Jobs that the broker or their worker lost are failed and refunded once, within a
bounded time; jobs that someone still holds are never touched (`llmjobs.reaper`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import requests
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from apikeys.models import ApiKey
from djangollmapi import processes
from djangollmapi.celery import app as celery_app
from llmjobs import admission, events, lifecycle, reaper, taskmessage
from llmjobs.models import Job, UsageDay
from llmjobs.reaper import ActiveJob, Sightings, judge
from llmjobs.routing import device_queue_name
from tests.conftest import child_env, data_dir, free_port, logs_dir, start_web, wait_for_http
from tests.helpers import CheckedChat, key_row, wait_until

QUEUED, RUNNING = Job.Status.QUEUED, Job.Status.RUNNING


# --- the decision, pure --------------------------------------------------------------


def job(status: str = QUEUED, queue: str = "q", worker: str = "w") -> ActiveJob:
    return ActiveJob("j", status, queue, "m", worker if status == RUNNING else "")


J = frozenset({"j"})
LIVE_Q = {"alive_queues": frozenset({"q"}), "alive_workers": frozenset({"w"})}


@pytest.mark.parametrize(
    ("status", "sightings", "seen"),
    [
        (QUEUED, Sightings(listed={"j": "q"}, **LIVE_Q), True),  # its live worker will take its message
        (QUEUED, Sightings(held=J), True),
        (QUEUED, Sightings(in_broker=J), True),  # a message it cannot read: the safe side
        (QUEUED, Sightings(**LIVE_Q), False),  # its worker lives, its message is gone
        (QUEUED, Sightings(listed={"j": "q"}), False),  # in a queue nobody serves or restarts
        (QUEUED, Sightings(listed={"j": "q"}, supervised_queues=frozenset({"q"})), True),  # its worker restarts
        (QUEUED, Sightings(unacked={"j": "tag"}, **LIVE_Q), False),  # taken by a worker no longer alive
        (RUNNING, Sightings(held=J), True),  # its worker publishes it: running
        (RUNNING, Sightings(unacked={"j": "tag"}, **LIVE_Q), True),  # its worker lives
        (RUNNING, Sightings(unacked={"j": "tag"}, alive_queues=frozenset({"q"})), False),  # another one of q
        (RUNNING, Sightings(unacked={"j": "tag"}), False),  # held unacked by a worker now dead
        (RUNNING, Sightings(**LIVE_Q), False),  # its worker no longer runs it
    ],
)
def test_where_a_job_counts_as_held(status, sightings, seen):
    assert reaper.is_seen(job(status), sightings) is seen


def test_a_queued_job_in_a_dead_queue_waits_for_a_restart_unless_a_replica_can_take_it():
    listed = {"listed": {"j": "q"}, "supervised_queues": frozenset({"q"})}
    replicas = {"m": ["q", "r"]}
    assert reaper.is_seen(job(), Sightings(**listed), replicas)
    live_replica = Sightings(**listed, alive_queues=frozenset({"r"}))
    assert not reaper.is_seen(job(), live_replica, replicas)
    (stranded,) = judge([job()], live_replica, {"j": 0.0}, now=100.0, grace_s=30, replicas=replicas).stranded
    assert stranded.targets == ("r",)


def test_a_stranded_job_goes_to_a_live_queue_else_back_to_a_restarting_one_else_it_is_lost():
    def verdict(**sightings):
        return judge([job()], Sightings(**sightings), {"j": 0.0}, now=100.0, grace_s=30, replicas={"m": ["q", "r"]})

    # unacknowledged, nobody live holds it: its own queue is live again, or a replica
    assert verdict(unacked={"j": "t"}, alive_queues=frozenset({"q", "r"})).stranded[0].targets == ("q", "r")
    assert verdict(unacked={"j": "t"}, supervised_queues=frozenset({"q"})).stranded[0].targets == ("q",)
    (lost,) = verdict(unacked={"j": "t"}).lost
    assert lost.code == "job_lost"
    (lost,) = verdict(listed={"j": "q"}).lost  # nobody serves or restarts q, no replica
    assert lost.code == "job_lost"


def test_a_job_is_lost_only_once_every_look_missed_it_for_the_grace():
    lost = job()
    assert judge([lost], Sightings(), {}, now=100.0, grace_s=30).newly_unseen == ["j"]
    assert judge([lost], Sightings(), {"j": 80.0}, now=100.0, grace_s=30).lost == []
    (ended,) = judge([lost], Sightings(), {"j": 70.0}, now=100.0, grace_s=30).lost
    assert (ended.job, ended.code) == (lost, "job_lost")


def test_a_job_seen_again_has_its_count_dropped():
    verdict = judge([job()], Sightings(in_broker=frozenset({"j"})), {"j": 0.0}, now=100.0, grace_s=30)
    assert (verdict.seen_again, verdict.newly_unseen, verdict.lost) == (["j"], [], [])
    assert judge([job()], Sightings(in_broker=frozenset({"j"})), {}, now=100.0, grace_s=30).seen_again == []


def test_a_running_job_without_a_live_worker_is_worker_lost_else_job_lost():
    (dead,) = judge([job(RUNNING)], Sightings(alive_queues=frozenset({"q"})), {"j": 0.0}, now=100.0, grace_s=30).lost
    assert dead.code == "worker_lost"  # its queue has another live worker, not the one that ran it
    (alive,) = judge([job(RUNNING)], Sightings(**LIVE_Q), {"j": 0.0}, 100.0, 30).lost
    assert alive.code == "job_lost"


def test_sweeps_come_several_times_a_grace_at_most_every_5_s():
    assert [reaper.sweep_every_s(grace) for grace in (1, 6, 30, 300)] == [0.5, 1.0, 5.0, 5.0]


# --- one sweep in this process: the real database and Redis --------------------------

# A queue in no config, and a model no deployment names: the suite's own supervisors,
# sweeping the configured queues, never judge these jobs while these tests do, and no
# replica could take them.
TEST_QUEUE = device_queue_name("cuda:9")
TEST_MODEL = "reaped"
GRACE_S = 0.3


@pytest.fixture
def charged(transactional_db, redis_server) -> Iterator:
    """`charged(status)`: an old job on TEST_QUEUE (past any grace), its key charged the
    call and its reservation as admission charges them."""
    made: list[Job] = []

    def make(status: str = QUEUED, worker: str = "gone@host") -> Job:
        api_key, _ = ApiKey.objects.issue(name="reaped")
        request = CheckedChat(reserve_tokens=5, input_text="hi")
        reserved = admission.reservation(request)
        ApiKey.objects.filter(id=api_key.id).update(calls_used=1, tokens_used=reserved)
        old = timezone.now() - timedelta(minutes=5)
        made_job = admission.create_job(api_key.id, TEST_MODEL, request, queue=TEST_QUEUE, created_at=old)
        if status == RUNNING:
            assert lifecycle.start(str(made_job.id), worker)
        made.append(made_job)
        return made_job

    yield make
    redis_server.delete(TEST_QUEUE, *(events.stream_key(str(j.id)) for j in made))
    if made:
        redis_server.hdel(reaper.UNSEEN_KEY, *(str(j.id) for j in made))
    events.clear_heartbeat(TEST_QUEUE)
    events.clear_supervisor(TEST_QUEUE, events.local_worker(TEST_QUEUE))


def sweep_twice() -> list[reaper.Lost]:
    """A first look, and one more after the grace: what a job missed by both needs."""
    first = reaper.sweep(GRACE_S, [TEST_QUEUE])
    time.sleep(GRACE_S + 0.05)
    return first + reaper.sweep(GRACE_S, [TEST_QUEUE])


def send_message(job_id: str) -> None:
    """The job's message, sent to its queue as `sending.enqueue` sends it."""
    celery_app.send_task(taskmessage.RUN_TASK, args=(job_id, TEST_MODEL, "run", "hi"), task_id=job_id, queue=TEST_QUEUE)


def test_a_queued_job_nothing_holds_is_failed_and_refunded_once(charged):
    lost = charged()
    (ended,) = sweep_twice()

    row = Job.objects.get(id=lost.id)
    assert (ended.code, row.status, row.error_code, row.refunded) == ("job_lost", "failed", "job_lost", True)
    assert (key_row_of(row).calls_used, key_row_of(row).tokens_used) == (0, 0)
    assert events.terminal_event(str(lost.id))[1]["code"] == "job_lost"  # a waiting client hears it
    assert reaper.sweep(GRACE_S, [TEST_QUEUE]) == []  # once
    assert key_row_of(row).calls_used == 0
    assert UsageDay.objects.get().refunded == 1


def key_row_of(job_row: Job) -> ApiKey:
    return ApiKey.objects.get(id=job_row.api_key_id)


def test_a_job_younger_than_the_grace_is_never_touched(charged, redis_server):
    young = charged()
    Job.objects.filter(id=young.id).update(created_at=timezone.now())
    assert reaper.sweep(60, [TEST_QUEUE]) == []
    assert Job.objects.get(id=young.id).status == QUEUED
    assert not redis_server.hexists(reaper.UNSEEN_KEY, str(young.id))  # not even counted


def test_a_queued_job_whose_message_waits_in_its_served_queue_is_left_alone(charged):
    waiting = charged()
    send_message(str(waiting.id))
    events.beat(TEST_QUEUE, ttl_s=30)
    assert sweep_twice() == []
    assert Job.objects.get(id=waiting.id).status == QUEUED


def test_a_queued_job_waits_for_its_worker_while_a_supervisor_restarts_it(charged):
    waiting = charged()
    send_message(str(waiting.id))
    events.beat_supervisor(TEST_QUEUE, events.local_worker(TEST_QUEUE), ttl_s=30)  # no worker: a restart
    assert sweep_twice() == []
    assert Job.objects.get(id=waiting.id).status == QUEUED


def test_a_queued_job_in_a_queue_nobody_serves_or_restarts_is_failed_and_refunded(charged, redis_server):
    stranded = charged()
    send_message(str(stranded.id))  # its worker, host and supervisor died for good
    (ended,) = sweep_twice()
    row = Job.objects.get(id=stranded.id)
    assert (ended.code, row.status, row.refunded) == ("job_lost", "failed", True)
    assert redis_server.llen(TEST_QUEUE) == 1  # left there: a worker that comes back drops it


def test_a_job_held_unacknowledged_by_a_live_worker_is_left_alone(charged, redis_server):
    held = charged()
    send_message(str(held.id))
    with celery_app.connection_for_write() as connection:
        # kombu's own delivery: off the list, into the unacked hash, as a worker takes it
        message = connection.default_channel.basic_get(TEST_QUEUE, no_ack=False)
        assert message is not None and redis_server.llen(TEST_QUEUE) == 0
        events.beat(TEST_QUEUE, ttl_s=30)
        events.publish_device_state(TEST_QUEUE, 1, {}, {}, ttl_s=30, held=[str(held.id)])
        assert sweep_twice() == []
        message.ack()
    assert Job.objects.get(id=held.id).status == QUEUED


def test_a_message_its_dead_worker_held_goes_back_to_the_head_of_its_live_queue(charged, redis_server):
    held, behind = charged(), charged()
    send_message(str(held.id))
    other = "dla.device.cuda-9@the-other-host"
    with celery_app.connection_for_write() as connection:
        # taken by a worker whose host then died with its supervisor: nobody restores it
        assert connection.default_channel.basic_get(TEST_QUEUE, no_ack=False) is not None
        send_message(str(behind.id))
        events.beat(TEST_QUEUE, ttl_s=30, worker=other)  # the queue's worker on another host lives on
        (moved,) = sweep_twice()
        assert (moved.job.id, moved.target) == (str(held.id), TEST_QUEUE)
        assert str(held.id) not in "".join(redis_server.hvals("unacked"))
        head = json.loads(redis_server.lindex(TEST_QUEUE, -1))  # the end kombu's consumers take first
        assert head["headers"]["id"] == str(held.id) and head["headers"]["redelivered"] is True
        assert head["properties"]["delivery_info"]["routing_key"] == TEST_QUEUE
        assert redis_server.llen(TEST_QUEUE) == 2
        assert Job.objects.get(id=held.id).status == QUEUED
        assert sweep_twice() == []  # listed in a served queue now: seen
    events.clear_heartbeat(TEST_QUEUE, other)


def test_a_running_job_its_live_worker_publishes_is_left_alone_until_it_stops(charged):
    running = charged(RUNNING, worker=events.local_worker(TEST_QUEUE))
    events.beat(TEST_QUEUE, ttl_s=30)
    events.publish_device_state(TEST_QUEUE, 0, {}, {}, ttl_s=30, held=[str(running.id)])
    assert sweep_twice() == []
    assert Job.objects.get(id=running.id).status == RUNNING

    # Its worker lives on but no longer holds it (its ending was lost): nobody will end it.
    events.publish_device_state(TEST_QUEUE, 0, {}, {}, ttl_s=30, held=[])
    (ended,) = sweep_twice()
    assert ended.code == "job_lost"
    assert Job.objects.get(id=running.id).refunded


def test_a_running_job_whose_worker_is_gone_is_worker_lost(charged, redis_server):
    orphan = charged(RUNNING)
    send_message(str(orphan.id))
    with celery_app.connection_for_write() as connection:
        message = connection.default_channel.basic_get(TEST_QUEUE, no_ack=False)  # held by the dead worker
        (ended,) = sweep_twice()  # no heartbeat: the unacked message runs nowhere
        message.ack()
    row = Job.objects.get(id=orphan.id)
    assert (ended.code, row.error_code, row.refunded) == ("worker_lost", "worker_lost", True)
    assert key_row_of(row).calls_used == 0


def test_a_job_seen_again_starts_its_count_over(charged, redis_server):
    flickering = charged()
    job_id = str(flickering.id)
    events.beat(TEST_QUEUE, ttl_s=30)
    assert reaper.sweep(GRACE_S, [TEST_QUEUE]) == []  # missed: its count starts
    first_missed = float(redis_server.hget(reaper.UNSEEN_KEY, job_id))
    send_message(job_id)
    time.sleep(GRACE_S + 0.05)
    assert reaper.sweep(GRACE_S, [TEST_QUEUE]) == []  # there after all: the count is dropped
    assert not redis_server.hexists(reaper.UNSEEN_KEY, job_id)
    redis_server.delete(TEST_QUEUE)
    assert reaper.sweep(GRACE_S, [TEST_QUEUE]) == []  # missed again, counted from now
    assert float(redis_server.hget(reaper.UNSEEN_KEY, job_id)) >= first_missed + GRACE_S
    assert Job.objects.get(id=flickering.id).status == QUEUED


def test_nothing_is_ended_while_redis_cannot_be_read(charged):
    silent = charged()
    down = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    for _ in range(2):
        with pytest.raises(redis.ConnectionError):
            reaper.sweep(GRACE_S, [TEST_QUEUE], client=down)
        time.sleep(GRACE_S)
    assert Job.objects.get(id=silent.id).status == QUEUED


def test_reapjobs_watches_the_grace_then_prints_what_it_ended(charged, capsys):
    lost = Job.objects.filter(id=charged().id)
    lost.update(queue=device_queue_name("cuda:7"))  # a configured queue no worker serves
    server = settings.LLM_CONFIG.server.model_copy(update={"reap_after_s": 1.0})
    with override_settings(LLM_CONFIG=settings.LLM_CONFIG.model_copy(update={"server": server})):
        call_command("reapjobs")
    out = capsys.readouterr().out
    assert f"{lost.get().id} {TEST_MODEL} (queued on dla.device.cuda-7): failed job_lost, refunded" in out
    assert "Ended 1 lost job(s)." in out
    assert lost.get().status == Job.Status.FAILED


# --- live: a real broker that dies, real workers, real HTTP ---------------------------

STACK_GRACE_S = 2.0
STACK_CONFIG = f"""
[server]
allowed_hosts = ["127.0.0.1", "localhost"]
job_timeout_s = 60
reap_after_s = {STACK_GRACE_S}

[worker]
heartbeat_s = 0.5
max_held = 1  # the worker holds its running job only: the rest wait in Redis

[[deployments]]
name = "reaper-slow"
algorithm = "algorithms.echo:Echo"
device = "cpu:6"
options = {{ delay_ms = 10000 }}

[[deployments]]
name = "reaper-quick"
algorithm = "algorithms.echo:Echo"
device = "cpu:6"

[[deployments]]
name = "reaper-doomed"
algorithm = "algorithms.echo:Echo"
device = "cpu:7"
options = {{ delay_ms = 40000 }}
"""


@dataclass
class Stack:
    """Our own Redis (so that killing it harms no other test), a web server and the
    worker of device cpu:6 on it; `start_worker("cpu:7")` adds one more."""

    socket: Path
    port: int = 0
    redis_process: subprocess.Popen | None = None
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {"REDIS_URL": f"unix://{self.socket}", "DJANGO_LLM_API_CONFIG": str(data_dir() / "reaper.toml")}

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(f"unix://{self.socket}", decode_responses=True)

    def start_redis(self) -> None:
        self.redis_process = processes.start_embedded_redis(self.socket, logs_dir() / "reaper-redis.log")

    def kill_redis(self) -> None:
        self.redis_process.send_signal(signal.SIGKILL)
        self.redis_process.wait(5)

    def start_worker(self, device: str) -> subprocess.Popen:
        log = logs_dir() / f"reaper-worker-{device.replace(':', '-')}.log"
        argv = processes.manage_argv("runworker", device, "--loglevel", "WARNING")
        process = processes.spawn(argv, child_env(**self.env), log)
        self.processes.append(process)
        heartbeat = events.heartbeat_key(device_queue_name(device))

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"the worker for {device} exited; see {log}")
            return bool(self.redis.exists(heartbeat))

        wait_until(ready, 120, f"the worker for {device}")
        return process

    def post(self, path: str, key: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return requests.post(f"http://127.0.0.1:{self.port}{path}", headers=headers, timeout=30, **kwargs)

    def get(self, path: str, key: str) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"}
        return requests.get(f"http://127.0.0.1:{self.port}{path}", headers=headers, timeout=30)

    def submit(self, key: str, model: str, text: str) -> str:
        reply = self.post("/api/jobs/", key, json={"text": text, "model": model})
        assert reply.status_code == 202, reply.text
        return reply.json()["job_id"]


@pytest.fixture(scope="module")
def stack(django_db_setup, django_db_blocker) -> Iterator[Stack]:
    (data_dir() / "reaper.toml").write_text(STACK_CONFIG)
    built = Stack(socket=data_dir() / "reaper-redis.sock")
    built.start_redis()
    try:
        with django_db_blocker.unblock():
            built.port = free_port()
            web = start_web(built.port, **built.env)
            built.processes.append(web)
            built.start_worker("cpu:6")
        wait_for_http(f"http://127.0.0.1:{built.port}/api/usage/", web)
        yield built
    finally:
        for process in built.processes:
            processes.stop(process)
        processes.stop(built.redis_process)


def job_row(job_id: str) -> Job:
    return Job.objects.get(id=job_id)


@pytest.mark.faults
@pytest.mark.django_db(transaction=True)
def test_jobs_a_restarted_broker_lost_are_failed_and_refunded_while_a_running_one_finishes(stack, key):
    still_running = stack.submit(key, "reaper-slow", "still here")
    wait_until(lambda: job_row(still_running).status == RUNNING, 20, "the slow job to start")
    before = key_row(key)
    lost = [stack.submit(key, "reaper-quick", f"lost {n}") for n in range(3)]
    assert key_row(key).calls_used == before.calls_used + 3
    queue = device_queue_name("cpu:6")
    assert stack.redis.llen(queue) == 3  # not held: waiting in Redis behind the running job

    killed = time.monotonic()
    stack.kill_redis()  # the broker dies with its queue, and comes back empty
    stack.start_redis()

    def all_failed() -> bool:
        return Job.objects.filter(id__in=lost, status=Job.Status.FAILED).count() == 3

    wait_until(all_failed, STACK_GRACE_S + 15, "the lost jobs to be failed")
    took = time.monotonic() - killed
    assert took >= STACK_GRACE_S  # missed for the whole grace first
    rows = [job_row(job_id) for job_id in lost]
    assert {(row.error_code, row.refunded) for row in rows} == {("job_lost", True)}
    after = key_row(key)
    assert (after.calls_used, after.tokens_used) == (before.calls_used, before.tokens_used)
    assert job_row(still_running).status == RUNNING  # its worker holds it: untouched
    detail = stack.get(f"/api/jobs/{lost[0]}/", key).json()
    assert (detail["status"], detail["error"]["code"]) == ("failed", "job_lost")
    assert "queue_position" not in detail

    finished = wait_until(lambda: job_row(still_running).status == Job.Status.SUCCEEDED, 30, "the slow job")
    assert finished and job_row(still_running).output == "still here"
    assert key_row(key).calls_used == 1  # refunded once each, however many sweeps since
    assert UsageDay.objects.get(model="reaper-quick").refunded == 3
    # The worker found the new broker: the device serves again.
    again = stack.submit(key, "reaper-quick", "again")
    wait_until(lambda: job_row(again).status == Job.Status.SUCCEEDED, 20, "a job on the new broker")


@pytest.mark.faults
@pytest.mark.django_db(transaction=True)
def test_a_job_running_on_a_host_that_died_is_failed_by_another_hosts_supervisor(stack, key):
    doomed_host = stack.start_worker("cpu:7")
    doomed = stack.submit(key, "reaper-doomed", "never answered")
    wait_until(lambda: job_row(doomed).status == RUNNING, 20, "the doomed job to start")
    state = events.device_state_key(device_queue_name("cpu:7"))
    wait_until(lambda: doomed in json.loads(stack.redis.hget(state, "held") or "[]"), 5, "its worker to publish it")
    assert key_row(key).calls_used == 1

    killed = time.monotonic()
    os.killpg(doomed_host.pid, signal.SIGKILL)  # supervisor and worker at once: nobody left to recover
    doomed_host.wait(5)

    wait_until(lambda: job_row(doomed).status == Job.Status.FAILED, 30, "the job to be failed")
    assert time.monotonic() - killed >= STACK_GRACE_S
    row = job_row(doomed)
    assert (row.error_code, row.refunded) == ("worker_lost", True)
    assert (key_row(key).calls_used, key_row(key).tokens_used) == (0, 0)
    detail = stack.get(f"/api/jobs/{doomed}/", key).json()
    assert (detail["status"], detail["error"]["code"]) == ("failed", "worker_lost")
