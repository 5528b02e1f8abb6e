"""One model on several devices (`devices = [...]`), and one device name on several
hosts: each job goes to the replica with the shortest expected wait, none to a
replica whose worker is down, and the jobs a dead worker left queued go to a live one
(or fail, refunded, when there is none); every device still runs its jobs one at a
time."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from djangollmapi import processes
from djangollmapi.config.loader import parse_config
from djangollmapi.config.types import ConfigError
from llmjobs import events, reaper
from llmjobs.models import Job
from llmjobs.routing import QueueState, WorkerState, choose_replica, device_queue_name, queue_device, worker_name
from tests.conftest import start_worker, wait_for_heartbeat
from tests.helpers import error_of, key_row, wait_until

# --- the choice, pure -------------------------------------------------------------------


def replica(queue: str = "q", workers: int = 1, holding: int = 0, listed: int = 0, pending: int = 0, **pace):
    """A queue with `workers` live workers holding `holding` jobs each (all running);
    `pace`: the model's `max_batch` and `job_s` on each."""
    pace = {"m": pace} if pace else {}
    found = tuple(WorkerState(f"{queue}@{n}", holding, pace=pace) for n in range(workers))
    return QueueState(queue, found, listed, pending)


def choice(*states: QueueState) -> int:
    return choose_replica(states, "m")


def test_idle_replicas_take_jobs_in_config_order():
    assert choice(replica("a"), replica("b")) == 0


def test_the_shortest_expected_wait_wins_not_the_shortest_queue():
    assert choice(replica("a", holding=2), replica("b", holding=1)) == 1
    # four quick jobs wait less than one slow one
    assert choice(replica("a", holding=1, job_s=2.0), replica("b", holding=4, job_s=0.1)) == 1
    # a batch of 4 slots with 3 in it waits less than one slot with 1
    assert choice(replica("a", holding=1, max_batch=1, job_s=1.0), replica("b", holding=3, max_batch=4, job_s=1.0)) == 1
    # two workers of one device name (two hosts) share its queue's load
    assert choice(replica("a", holding=3, listed=1), replica("b", workers=2, holding=2, listed=1)) == 1


def test_jobs_sent_but_not_yet_published_count():
    assert choice(replica("a", pending=1), replica("b")) == 1
    assert choice(replica("a", listed=1), replica("b")) == 1


def test_a_tie_goes_to_the_fewest_queued():
    running = replica("a", holding=2, max_batch=2)  # 2 running in 2 slots
    waiting = QueueState("b", (WorkerState("b@0", holding=1, waiting=1),))  # 1 waiting in 1 slot
    assert running.expected_wait_s("m") == waiting.expected_wait_s("m")
    assert choice(waiting, running) == 1


def test_a_replica_without_a_live_worker_gets_nothing():
    assert choice(QueueState("a"), replica("b", holding=50)) == 1
    assert choice(QueueState("a"), QueueState("b")) == 0  # none live: the first, whose 503 says so


def test_a_replica_whose_model_failed_to_load_gets_nothing_while_another_has_it():
    failed = QueueState("a", (WorkerState("a@0", models={"m": {"state": "failed", "error": "gone"}}),))
    assert choice(failed, replica("b", holding=9)) == 1
    assert choice(failed, QueueState("b")) == 0  # its 503 says why


def test_worker_names_and_queues():
    assert worker_name(device_queue_name("cuda:0"), "gpu-7") == "dla.device.cuda-0@gpu-7"
    assert [queue_device(device_queue_name(d)) for d in ("cpu", "cpu:5", "cuda:0", "mps")] == [
        "cpu",
        "cpu:5",
        "cuda:0",
        "mps",
    ]


# --- the config --------------------------------------------------------------------------


def config(text: str):
    return parse_config(tomllib.loads(text), "test.toml", Path("/tmp"))


def test_a_deployment_names_one_device_or_several():
    loaded = config(
        "[[deployments]]\nname = 'r'\nalgorithm = 'a:B'\ndevices = ['cuda:0', 'cuda:1']\n"
        "[[deployments]]\nname = 's'\nalgorithm = 'a:B'\ndevice = 'cuda:1'\n"
        "[[deployments]]\nname = 't'\nalgorithm = 'a:B'\n"
    )
    r, s, t = loaded.deployments
    assert (r.device, r.devices, r.replicated) == (None, ("cuda:0", "cuda:1"), True)
    assert (s.device, s.devices, s.replicated) == ("cuda:1", ("cuda:1",), False)
    assert (t.device, t.devices) == ("cpu", ("cpu",))
    assert loaded.devices == ["cuda:0", "cuda:1", "cpu"]
    assert [d.name for d in loaded.deployments_on("cuda:1")] == ["r", "s"]


@pytest.mark.parametrize(
    ("placement", "key", "reason"),
    [
        ("device = 'cuda:0'\ndevices = ['cuda:1']", "deployments[0].devices", "set device or devices, not both"),
        ("devices = ['cuda:0', 'cuda:0']", "deployments[0].devices[1]", "'cuda:0' is listed twice"),
        ("devices = []", "deployments[0].devices", "must list at least one device"),
        ("devices = ['gpu0']", "deployments[0].devices[0]", "not cpu, cpu:N, cuda:N or mps"),
        ("devices = 'cuda:0'", "deployments[0].devices", "must be an array"),
    ],
)
def test_a_bad_placement_is_refused_with_its_key(placement, key, reason):
    with pytest.raises(ConfigError) as refused:
        config(f"[[deployments]]\nname = 'r'\nalgorithm = 'a:B'\n{placement}\n")
    assert refused.value.key == key and reason in refused.value.reason


def test_the_node_comes_from_the_environment_else_the_config(monkeypatch):
    text = "[worker]\nnode = 'rack-1.gpu-3'\n"
    monkeypatch.delenv("DLA_NODE", raising=False)
    assert config(text).worker.node == "rack-1.gpu-3"
    monkeypatch.setenv("DLA_NODE", "host-b")
    assert config(text).worker.node == "host-b"
    monkeypatch.delenv("DLA_NODE")
    with pytest.raises(ConfigError) as refused:
        config("[worker]\nnode = 'two words'\n")
    assert refused.value.key == "worker.node"


# --- routing in this process: real Redis and database, workers written as they publish ---

ORPHANS = [device_queue_name("cuda:5"), device_queue_name("cuda:6")]  # `replicated-orphan`'s


@pytest.fixture
def orphan_workers(redis_server) -> Iterator:
    """`publish(queue, holding, job_s)`: a live worker of one of `replicated-orphan`'s
    queues, written as a worker writes it."""

    def publish(queue: str, holding: int = 0, job_s: float | None = None, waiting: list[str] | None = None) -> None:
        waiting = waiting or []
        running = holding - len(waiting)
        deployments = {"replicated-orphan": {"waiting": waiting, "running": running, "max_batch": 1, "job_s": job_s}}
        held = [f"held-{n}" for n in range(running)] + waiting
        models = {"replicated-orphan": {"state": "loaded"}}
        events.beat(queue, ttl_s=30)
        events.publish_device_state(queue, len(waiting), models, deployments, ttl_s=30, held=held)

    yield publish
    for queue in ORPHANS:
        events.clear_heartbeat(queue)
        redis_server.delete(queue, events.routed_key(queue))  # messages no worker will take


def post_job(api, key) -> Job:
    reply = api.post("/api/jobs/", key, json={"text": "hi", "model": "replicated-orphan"})
    assert reply.status_code == 202, reply.content
    return Job.objects.get(id=json.loads(reply.content)["job_id"])


@pytest.mark.django_db(transaction=True)
def test_a_job_goes_to_the_replica_that_will_free_up_first(api, key, orphan_workers):
    orphan_workers(ORPHANS[0], holding=3, job_s=0.5)  # 1.5 s of work
    orphan_workers(ORPHANS[1], holding=1, job_s=2.0)  # 2 s
    assert post_job(api, key).queue == ORPHANS[0]


@pytest.mark.django_db(transaction=True)
def test_jobs_sent_together_spread_before_any_worker_publishes_them(api, key, orphan_workers):
    for queue in ORPHANS:
        orphan_workers(queue)
    queues = [post_job(api, key).queue for _ in range(4)]
    assert sorted(queues) == sorted(ORPHANS * 2)


@pytest.mark.django_db(transaction=True)
def test_a_replica_with_no_live_worker_gets_nothing(api, key, orphan_workers):
    orphan_workers(ORPHANS[1], holding=20, job_s=1.0)
    assert {post_job(api, key).queue for _ in range(3)} == {ORPHANS[1]}


@pytest.mark.django_db(transaction=True)
def test_no_live_replica_is_503_no_worker_and_refunded(api, key):
    reply = api.post("/api/", key, json={"text": "hi", "model": "replicated-orphan"})
    assert (reply.status_code, error_of(reply)["code"]) == (503, "no_worker")
    (job,) = Job.objects.all()
    assert (job.status, job.error_code, job.refunded, job.queue) == ("failed", "no_worker", True, ORPHANS[0])
    assert key_row(key).calls_used == 0


@pytest.mark.django_db(transaction=True)
def test_a_full_replica_answers_429_with_its_own_drain_time(api, key, orphan_workers):
    waiting = [f"w{n}" for n in range(60)]  # past the suite's max_queue_depth of 50
    orphan_workers(ORPHANS[0], holding=61, job_s=1.0, waiting=waiting)
    reply = api.post("/api/", key, json={"text": "hi", "model": "replicated-orphan"})
    assert (reply.status_code, error_of(reply)["code"]) == (429, "queue_full")
    assert reply["Retry-After"] == "11"  # 11 over the depth, one a second
    assert Job.objects.get().queue == ORPHANS[0]


@pytest.mark.django_db(transaction=True)
def test_a_queued_job_shows_its_place_on_its_replica(api, key, orphan_workers):
    orphan_workers(ORPHANS[1], holding=1, job_s=2.0)
    job = post_job(api, key)
    orphan_workers(ORPHANS[1], holding=3, job_s=2.0, waiting=["before", str(job.id)])
    body = json.loads(api.get(f"/api/jobs/{job.id}/", key).content)
    assert (body["status"], body["queue_position"], body["eta_s"]) == ("queued", 1, 4.0)


# --- live: real workers on two replicas, and on one device name from two hosts ----------

REPLICAS = {device: device_queue_name(device) for device in ("cpu:5", "cpu:6")}  # `replicated`'s
TWIN = device_queue_name("cpu:4")  # `twin-hosts`'
GRACE_S = 1.0  # the sweeps of these tests; the suite's supervisors wait 30 s


@pytest.fixture
def workers(live) -> Iterator:
    """`start(device, **env)`: a supervised worker of `device` (env `DLA_NODE`: on
    another "host"), ready; all stopped after the test."""
    started: list[subprocess.Popen] = []

    def start(*devices: str, **env: str) -> list[subprocess.Popen]:
        batch = [start_worker(device, **env) for device in devices]
        started.extend(batch)
        for device, process in zip(devices, batch, strict=True):
            wait_for_heartbeat(live.redis, device, process)
            if "DLA_NODE" in env:  # the device may have a live worker on another host already
                name = worker_name(device_queue_name(device), env["DLA_NODE"])
                queue = device_queue_name(device)
                wait_until(lambda: name in {w.name for w in events.queue_state(queue).workers}, 60, name)  # noqa: B023
        return batch

    yield start
    for process in started:
        processes.stop(process)


def call_all(live, key, model: str, n: int) -> list[dict]:
    """`n` concurrent `POST /api/` calls; each answer's run as the plug-in recorded it."""

    def call(i: int) -> dict:
        reply = live.post("/api/", key, json={"text": f"job {i}", "model": model})
        assert reply.status_code == 200, reply.text
        return reply.json()["message"]

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(call, range(n)))


def submit(live, key, model: str, n: int) -> list[str]:
    return [
        live.post("/api/jobs/", key, json={"text": f"async {i}", "model": model}).json()["job_id"] for i in range(n)
    ]


def one_at_a_time(rows: list[Job]) -> None:
    """No two of these jobs ran at once (their rows' run intervals)."""
    runs = sorted(rows, key=lambda row: row.started_at)
    for earlier, later in itertools.pairwise(runs):
        assert earlier.finished_at <= later.started_at, (earlier.id, later.id)


def kill(process: subprocess.Popen) -> None:
    """The worker's host dies: its supervisor and worker process at once, nobody left
    to clean up after it."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(5)


def sweep_until_ended(job_ids: list[str], queues: list[str], timeout_s: float = 60) -> list:
    """Sweep as the supervisors do, with a short grace, until every job ended."""
    swept: list = []

    def ended() -> bool:
        time.sleep(0.2)
        swept.extend(reaper.sweep(GRACE_S, queues))
        return not Job.objects.filter(id__in=job_ids, status__in=Job.ACTIVE).exists()

    wait_until(ended, timeout_s, "every job to end")
    return swept


def held_by(queue: str, worker: str) -> set[str]:
    return events.held_jobs([queue])[queue].get(worker, set())


@pytest.mark.faults
@pytest.mark.django_db(transaction=True)
def test_concurrent_jobs_keep_both_replicas_busy_each_one_job_at_a_time(live, key, workers):
    workers(*REPLICAS)
    runs = call_all(live, key, "replicated", 20)
    rows = list(Job.objects.filter(model="replicated"))
    by_device = {device: [row for row in rows if row.device == device] for device in REPLICAS}
    assert {device: len(jobs) >= 6 for device, jobs in by_device.items()} == {d: True for d in REPLICAS}  # both busy
    for device, jobs in by_device.items():
        assert {row.worker for row in jobs} == {worker_name(REPLICAS[device], events.local_node())}
        one_at_a_time(jobs)
    by_pid = {
        pid: sorted((r for r in runs if r["pid"] == pid), key=lambda r: r["start"]) for pid in {r["pid"] for r in runs}
    }
    assert len(by_pid) == 2
    for mine in by_pid.values():
        assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(mine))
    first, second = by_pid.values()
    assert any(a["start"] < b["end"] and b["start"] < a["end"] for a in first for b in second)  # both at once


@pytest.mark.faults
@pytest.mark.django_db(transaction=True)
def test_a_dead_replica_gets_no_new_jobs_and_its_queued_ones_move_to_the_live_one(live, key, workers):
    doomed, survivor = workers(*REPLICAS)
    dead_queue, live_queue = REPLICAS["cpu:5"], REPLICAS["cpu:6"]
    dead_worker = worker_name(dead_queue, events.local_node())
    ids = submit(live, key, "replicated", 12)
    wait_until(lambda: len(held_by(dead_queue, dead_worker)) >= 3, 10, "cpu:5 to hold jobs")
    kill(doomed)
    wait_until(lambda: not events.worker_alive("cpu:5"), 10, "cpu:5's heartbeat to expire")

    fresh = submit(live, key, "replicated", 4)
    assert {row.queue for row in Job.objects.filter(id__in=fresh)} == {live_queue}
    left = list(Job.objects.filter(id__in=ids, queue=dead_queue, status__in=Job.ACTIVE))
    assert left  # what the dead worker held: one running, the rest waiting

    swept = sweep_until_ended(ids + fresh, list(REPLICAS.values()))
    moved = {outcome.job.id for outcome in swept if isinstance(outcome, reaper.Moved)}
    assert moved and {outcome.target for outcome in swept if isinstance(outcome, reaper.Moved)} == {live_queue}
    for row in Job.objects.filter(id__in=[job.id for job in left]):
        if str(row.id) in moved:  # waiting on the dead replica: ran on the live one
            assert (row.status, row.queue, row.worker) == (
                "succeeded",
                live_queue,
                worker_name(live_queue, events.local_node()),
            )
        else:  # running when its worker died: nobody can finish it
            assert (row.status, row.error_code, row.refunded) == ("failed", "worker_lost", True)
    rows = list(Job.objects.filter(id__in=ids + fresh))
    assert {row.status for row in rows} <= {"succeeded", "failed"}
    assert key_row(key).calls_used == sum(row.status == "succeeded" for row in rows)  # the failed ones refunded
    one_at_a_time([row for row in rows if row.queue == live_queue and row.started_at])
    assert survivor.poll() is None


@pytest.mark.faults
@pytest.mark.django_db(transaction=True)
def test_one_device_name_on_two_hosts_shares_its_queue_and_survives_one(live, key, workers):
    host_a, host_b = "dla.device.cpu-4@host-a", "dla.device.cpu-4@host-b"
    (doomed,) = workers("cpu:4", DLA_NODE="host-a")
    workers("cpu:4", DLA_NODE="host-b")
    assert {w.name for w in events.queue_state(TWIN).workers} == {host_a, host_b}  # both heartbeats

    call_all(live, key, "twin-hosts", 20)
    rows = list(Job.objects.filter(model="twin-hosts"))
    assert {row.worker for row in rows} == {host_a, host_b}
    for worker in (host_a, host_b):
        one_at_a_time([row for row in rows if row.worker == worker])

    ids = submit(live, key, "twin-hosts", 16)
    wait_until(lambda: len(held_by(TWIN, host_a)) >= 2, 10, "host-a to hold jobs")
    kill(doomed)
    wait_until(
        lambda: [w.name for w in events.queue_state(TWIN).workers] == [host_b], 10, "host-a's heartbeat to expire"
    )
    assert events.redis_client().exists(events.device_state_key(TWIN, host_b))  # host-b's own state stands

    swept = sweep_until_ended(ids, [TWIN])
    moved = [outcome for outcome in swept if isinstance(outcome, reaper.Moved)]
    assert moved and {outcome.target for outcome in moved} == {TWIN}  # back to its queue's head
    after = list(Job.objects.filter(id__in=ids))
    assert {row.status for row in after} <= {"succeeded", "failed"}
    assert {row.error_code for row in after if row.status == "failed"} <= {"worker_lost"}
    assert {row.worker for row in after if row.worker != host_a} <= {host_b}
    one_at_a_time([row for row in after if row.worker == host_b])
    again = live.post("/api/", key, json={"text": "still served", "model": "twin-hosts"})
    assert again.status_code == 200 and Job.objects.get(id=again.json()["job_id"]).worker == host_b
