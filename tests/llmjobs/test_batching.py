"""One device serves many jobs at once: generation is continuously batched (jobs join
and leave between decode steps), embeddings are merged into one call, slots go
fairly across keys, and a worker process that dies mid-batch fails and refunds every
job it held. Real worker processes, the tiny GPT-2 and MiniLM."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from llmjobs import events
from llmjobs.models import Job
from tests.helpers import key_row, wait_until
from tests.llmjobs.test_worker_lost import child_pids

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "tiny-gpt2-batch8"  # max_batch 8, up to 200 new tokens
PROMPTS = [f"worker {i} says" for i in range(8)]
# Plain prompts the tiny GPT-2 continues each in its own way (no chat template).
# (Not "queue": its answer runs into byte tokens whose logits tie to the last bits, so
# float rounding that differs with the batch's shape may pick either.)
VARIED = ["A worker process", "x", "1 2 3", "Hello", "zebra", "The quick brown fox", "worker 3 says", "Good"]


def complete(live, key: str, prompt: str) -> dict:
    body = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 100}
    response = live.post("/v1/completions", key, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def chat(live, key: str, prompt: str, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0, **extra}
    response = live.post("/v1/chat/completions", key, json=body)
    assert response.status_code == 200, response.text
    return response.json()


class Stream:
    """A streamed chat read in a thread: when its first token and its end arrived."""

    def __init__(self, live, key: str, prompt: str, max_tokens: int = 200) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        self.response = requests.post(
            f"{live.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            stream=True,
            timeout=60,
        )
        assert self.response.status_code == 200, self.response.text
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.job_id: uuid.UUID | None = None
        self.error: dict | None = None
        self.text = ""
        self.got_first = threading.Event()
        self.stop_after_first = threading.Event()
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self) -> None:
        for line in self.response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: ") :])
            if "error" in chunk:
                self.error = chunk["error"]
                break
            self.job_id = self.job_id or uuid.UUID(hex=chunk["id"].split("-", 1)[1])
            self.text += chunk["choices"][0]["delta"].get("content") or ""
            if self.first_token_at is None and self.text:
                self.first_token_at = time.monotonic()
                self.got_first.set()
            if self.stop_after_first.is_set():
                self.response.close()
                return
        self.ended_at = time.monotonic()
        self.got_first.set()

    def wait(self, timeout_s: float = 60) -> Stream:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the stream did not end"
        return self


def open_streams(live, key: str, prompts: list[str]) -> list[Stream]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        streams = list(pool.map(lambda prompt: Stream(live, key, prompt), prompts))
    for stream in streams:
        assert stream.got_first.wait(30), "no first token"
    return streams


def test_eight_jobs_run_together_and_each_answers_as_alone(live, key):
    alone = {prompt: complete(live, key, prompt)["choices"][0]["text"] for prompt in VARIED}
    assert len(set(alone.values())) == len(VARIED)  # the prompts lead to different answers

    with ThreadPoolExecutor(len(VARIED)) as pool:
        together = dict(zip(VARIED, pool.map(lambda p: complete(live, key, p), VARIED), strict=True))

    for prompt, answer in together.items():
        assert answer["choices"][0]["text"] == alone[prompt]
    ids = [uuid.UUID(hex=answer["id"].split("-", 1)[1]) for answer in together.values()]
    rows = list(Job.objects.filter(id__in=ids))
    assert max(row.started_at for row in rows) < min(row.finished_at for row in rows)  # all in flight at once
    assert max(row.batch_size for row in rows) > 1
    assert all(0 < row.device_s <= row.run_s + 0.01 for row in rows)
    # The key's usage says how much device time it took, per day.
    (today,) = live.get("/api/usage/", key).json()["days"]
    assert today["device_s"] == pytest.approx(sum(job.device_s for job in key_row(key).jobs.all()), abs=0.01)


def test_a_late_joiner_gets_its_first_token_before_the_others_finish(live, key):
    early = open_streams(live, key, PROMPTS[:7])
    late = Stream(live, key, PROMPTS[7])
    for stream in [*early, late]:
        stream.wait()
    assert late.first_token_at < min(stream.ended_at for stream in early)
    assert all(stream.error is None for stream in [*early, late])


def test_cancelling_one_stream_of_a_batch_stops_it_alone(live, key):
    streams = open_streams(live, key, PROMPTS)
    leaver = streams[0]
    leaver.stop_after_first.set()
    for stream in streams:
        stream.wait()
    cancelled = wait_until(lambda: Job.objects.filter(id=leaver.job_id, status=Job.Status.CANCELLED).first())
    assert cancelled.completion_tokens < 200
    others = Job.objects.filter(id__in=[s.job_id for s in streams[1:]])
    assert {job.status for job in others} == {Job.Status.SUCCEEDED}
    assert all(stream.error is None and stream.ended_at for stream in streams[1:])


def test_a_single_job_of_another_key_is_not_queued_behind_a_burst(live, make_key):
    burst, single = make_key(name="burst"), make_key(name="single")
    burst_ids = [
        live.post("/api/jobs/", burst, json={"text": f"a{i}", "model": "fair-echo"}).json()["job_id"] for i in range(40)
    ]
    wait_until(lambda: Job.objects.filter(id__in=burst_ids, status=Job.Status.SUCCEEDED).exists())
    single_id = live.post("/api/jobs/", single, json={"text": "b", "model": "fair-echo"}).json()["job_id"]

    job = wait_until(lambda: Job.objects.filter(id=single_id, status=Job.Status.SUCCEEDED).first(), 30)
    ahead = Job.objects.filter(id__in=burst_ids, started_at__lt=job.started_at).count()
    done_before_single_arrived = Job.objects.filter(id__in=burst_ids, finished_at__lt=job.created_at).count()
    # It waited for the slot that was busy and at most one more, not for the other 30-odd.
    assert ahead - done_before_single_arrived <= 2, (ahead, done_before_single_arrived)
    wait_until(lambda: Job.objects.filter(id__in=burst_ids, status=Job.Status.SUCCEEDED).count() == 40, 30)
    burst_rows = sorted(Job.objects.filter(id__in=burst_ids), key=lambda row: row.started_at)
    assert [row.input_text for row in burst_rows] == [f"a{i}" for i in range(40)]  # a key's own order


def test_embeddings_of_concurrent_requests_share_forward_passes(live, key):
    texts = [f"sentence number {i} about queues" for i in range(32)]

    def embed(text: str) -> list[float]:
        response = live.post("/v1/embeddings", key, json={"model": "minilm", "input": text})
        assert response.status_code == 200, response.text
        return response.json()["data"][0]["embedding"]

    alone = [embed(text) for text in texts]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(embed, texts))
    for mine, theirs in zip(alone, together, strict=True):
        assert max(abs(a - b) for a, b in zip(mine, theirs, strict=True)) < 1e-5
    rows = list(Job.objects.filter(model="minilm").order_by("-created_at")[:32])
    forward_calls = sum(1 / row.batch_size for row in rows)  # each call's jobs record its size
    assert round(forward_calls) < 32 and max(row.batch_size for row in rows) > 1


def test_a_killed_worker_process_fails_and_refunds_its_whole_batch(live, make_key):
    key = make_key()
    streams = open_streams(live, key, PROMPTS)
    waiting = Stream(live, key, "the ninth waits for a slot")  # max_batch 8: held, not started
    wait_until(lambda: Job.objects.filter(model=MODEL, status=Job.Status.QUEUED).exists())
    assert key_row(key).calls_used == 9
    (worker_process,) = child_pids(live.workers["cpu"].pid)

    os.kill(worker_process, signal.SIGKILL)

    for stream in streams:
        stream.wait(30)
        assert stream.error is not None and stream.error["code"] == "worker_lost"
    jobs = list(Job.objects.filter(id__in=[s.job_id for s in streams]))
    assert {(job.status, job.error_code, job.refunded) for job in jobs} == {(Job.Status.FAILED, "worker_lost", True)}
    # The job it held but had not started goes back to the queue and runs once it is back.
    waiting.wait(60)
    assert waiting.error is None and waiting.ended_at is not None
    assert Job.objects.get(id=waiting.job_id).status == Job.Status.SUCCEEDED
    assert key_row(key).calls_used == 1
    wait_until(lambda: events.worker_alive("cpu"), 60, "the restarted worker")
    assert chat(live, key, PROMPTS[0])["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_waiting_job_shows_its_place_and_an_eta(live, key):
    ids = [
        live.post("/api/jobs/", key, json={"text": f"q{i}", "model": "fair-echo"}).json()["job_id"] for i in range(12)
    ]
    wait_until(lambda: Job.objects.filter(id__in=ids, status=Job.Status.SUCCEEDED).count() >= 2)
    status = live.get(f"/api/jobs/{ids[-1]}/", key).json()
    assert status["status"] == "queued"
    # Published four times a second, so it may lag by a job or two (0.1 s each).
    assert 1 <= status["queue_position"] <= 10
    assert status["eta_s"] > 0  # from the recent jobs' run times
    wait_until(lambda: Job.objects.filter(id__in=ids, status=Job.Status.SUCCEEDED).count() == 12, 30)


def test_a_streamed_request_that_waits_hears_its_position(live, key):
    def stream(max_tokens: int) -> requests.Response:
        body = {"model": "slow-stream", "prompt": "tick", "max_tokens": max_tokens, "stream": True}
        return requests.post(
            f"{live.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, stream=True, timeout=30
        )

    first = stream(40)  # one job at a time on slow-stream: ~4 s of tokens
    lines = first.iter_lines()
    assert any(line.startswith(b"data: ") for line in lines)  # it runs
    second = stream(2)
    comments = []
    for line in second.iter_lines():
        if line.startswith(b": queued"):
            comments.append(line.decode())
            break
        assert not line.startswith(b"data: {"), "a token came before any position"
    first.close()
    second.close()
    assert comments and comments[0].startswith(": queued position=0")
    # Both end (cancelled) before the test does: a worker still writing their endings
    # when the next test empties the tables deadlocks with its TRUNCATE.
    active = Job.objects.filter(api_key=key_row(key), status__in=Job.ACTIVE)
    wait_until(lambda: not active.exists(), 30, "the closed streams' jobs to end")


def test_api_jobs_of_a_plugin_with_run_batch_are_grouped(live, key):
    texts = [f"text {i}" for i in range(8)]

    def run(text: str) -> dict:
        response = live.post("/api/", key, json={"text": text, "model": "batch-recorder"})
        assert response.status_code == 200, response.text
        return response.json()["message"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(run, texts))
    assert [answer["text"] for answer in answers] == texts  # each its own answer
    assert max(answer["batch"] for answer in answers) > 1
    assert all(answer["batch"] <= 4 for answer in answers)  # max_batch: the plug-in's default
    rows = Job.objects.filter(model="batch-recorder")
    assert max(row.batch_size for row in rows) == max(answer["batch"] for answer in answers)


def test_another_deployment_on_the_device_is_served_while_a_batch_decodes(live, key):
    streams = open_streams(live, key, PROMPTS)
    response = live.post("/api/", key, json={"text": "me too", "model": "echo"})
    answered = time.monotonic()
    assert response.json()["message"] == "me too"
    for stream in streams:
        stream.wait()
    assert answered < min(stream.ended_at for stream in streams)


def test_batched_jobs_past_their_deadline_leave_and_free_their_slots(live, key):
    def tick(max_tokens: int) -> requests.Response:
        body = {"model": "ticker", "prompt": "go", "max_tokens": max_tokens}
        return live.post("/v1/completions", key, json=body)

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        overrunning = list(pool.map(tick, [100, 100]))  # 5 s of steps each, 1 s allowed
    assert {response.status_code for response in overrunning} == {504}
    quick = tick(3)
    assert quick.status_code == 200 and quick.json()["choices"][0]["text"] == "tick tick tick "
    # Had the overrunning pair kept their slots, this one would have waited ~4 s more.
    assert time.monotonic() - started < 4
    rows = Job.objects.filter(model="ticker").order_by("created_at")
    assert [row.status for row in rows] == [Job.Status.FAILED, Job.Status.FAILED, Job.Status.SUCCEEDED]
    assert {row.error_code for row in rows[:2]} <= {"job_time_limit", "job_timeout"}
    assert all(row.refunded for row in rows[:2])
