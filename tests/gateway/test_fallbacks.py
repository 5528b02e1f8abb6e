"""Routes (`[[routes]]`): one model name, several backends tried in turn, and the
circuit breakers that make a failing provider skipped.

The providers are real: `fb-live` is our own `live` server; `fb-relay` is a server of
ours started and killed here, reached through a relay in this process that counts the
connections made to it; `fb-scripted` is a small HTTP server here that answers as
the test says (429 with Retry-After, a stream that dies before or after its first
event); `fb-down-*` and `fb-gone` listen nowhere; `fb-orphan` is a deployment on a
device no worker serves (tests/conftest.py `fallback_config`).
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
import requests
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from djangollmapi import processes
from djangollmapi.config import Deployment, parse_config
from djangollmapi.routes import FallbackRoute, LocalRoute, Target, route_local_model, route_model
from gateway import breaker
from gateway.breaker import CLOSED, HALF_OPEN, OPEN, Board, Policy, State, after_failure, after_success, decide
from llmjobs.models import Job, UsageDay
from tests.conftest import free_port, start_web, wait_for_http
from tests.helpers import error_of, key_row, recorded, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "one two three"}]
METRICS_TOKEN = "test-metrics-token"  # tests/djangollmapi.test.toml [metrics]
RELAY_COOLDOWN_S = 3  # fb-relay's cooldown_s; its allowed_fails is 2
SLACK_S = 10  # a bound on each wait, not a speed test


# --- the state machine ---------------------------------------------------------

POLICY = Policy(allowed_fails=3, window_s=60, cooldown_s=30, probe_s=5)


def failed(state: State, *times: float, retry_after_s: float | None = None) -> State:
    for now in times:
        state = after_failure(state, now, POLICY, retry_after_s)
    return state


def test_a_breaker_opens_at_allowed_fails_in_a_row_within_the_window():
    state = failed(State(), 100, 101)
    assert (state.phase(102), state.failures) == (CLOSED, 2)
    assert decide(state, 102, POLICY)[0].go
    state = failed(state, 102)
    assert (state.phase(102), state.failures, state.open_until) == (OPEN, 3, 132)
    decision, _ = decide(state, 110, POLICY)
    assert (decision.go, decision.reason, decision.wait_s) == (False, OPEN, 22)


def test_failures_further_apart_than_the_window_start_a_new_run():
    state = failed(State(), 100, 101, 170)  # the run that began at 100 is over at 160
    assert (state.phase(170), state.failures, state.first_failure) == (CLOSED, 1, 170)
    assert failed(State(), 100, 101, 159).phase(159) == OPEN


def test_a_success_ends_the_run():
    state = after_success(failed(State(), 100, 101))
    assert state == State()
    assert failed(state, 102, 103).phase(103) == CLOSED


def test_after_the_cooldown_one_probe_goes_and_its_outcome_decides():
    opened = failed(State(), 100, 101, 102)  # open until 132
    assert opened.phase(132) == HALF_OPEN
    probe, probing = decide(opened, 133, POLICY)
    assert (probe.go, probe.probe, probing.probe_until) == (True, True, 138)
    other, _ = decide(probing, 134, POLICY)
    assert (other.go, other.reason, other.wait_s) == (False, HALF_OPEN, 4)  # one probe at a time
    again, _ = decide(probing, 139, POLICY)
    assert again.probe  # a probe that never reported back is replaced after probe_s

    reopened = after_failure(probing, 135, POLICY)
    assert (reopened.phase(135), reopened.open_until, reopened.probe_until) == (OPEN, 165, 0)
    closed = after_success(probing)
    assert (closed.phase(135), closed.failures) == (CLOSED, 0)


def test_a_retry_after_skips_the_provider_that_long_and_outlives_a_success():
    state = failed(State(), 100, retry_after_s=7)
    assert state.phase(100) == CLOSED  # one failure: not open, only asked to wait
    decision, _ = decide(state, 103, POLICY)
    assert (decision.go, decision.reason, decision.wait_s) == (False, "retry_after", 4)
    assert not decide(after_success(state), 103, POLICY)[0].go
    assert decide(state, 107.5, POLICY)[0].go
    huge = failed(State(), 100, retry_after_s=10**9)
    assert huge.retry_until == 100 + breaker.MAX_RETRY_AFTER_S


def test_a_state_survives_its_stored_form():
    state = failed(State(), 100.25, 101.5, retry_after_s=3)
    assert State.from_fields({k.encode(): v.encode() for k, v in state.fields().items()}) == state
    assert State.from_fields({b"failures": b"x"}) == State()  # garbled: a fresh breaker


# --- the shared board, on the real Redis -------------------------------------------


def redis_board() -> Board:
    """A board of its own (as another web process has), on the suite's Redis."""
    return Board(redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5))


def test_every_process_sees_the_same_breaker_and_only_one_probes(redis_server):
    provider, policy = f"p-{uuid.uuid4().hex[:8]}", Policy(allowed_fails=2, window_s=60, cooldown_s=0.3, probe_s=5)
    first, second = redis_board(), redis_board()
    first.failed(provider, policy)
    second.failed(provider, policy)  # two processes, one run of failures
    assert first.report([provider])[provider] == {
        "state": OPEN,
        "consecutive_failures": 2,
        "retry_in_s": pytest.approx(0.3, abs=0.1),
    }
    assert (second.admit(provider, policy).reason, first.admit(provider, policy).reason) == (OPEN, OPEN)

    wait_until(lambda: first.report([provider])[provider]["state"] == HALF_OPEN, 2, "the cooldown to end")
    probe, others = second.admit(provider, policy), [first.admit(provider, policy), second.admit(provider, policy)]
    assert (probe.go, probe.probe) == (True, True)
    assert [(d.go, d.reason) for d in others] == [(False, HALF_OPEN)] * 2  # one probe, whoever asks
    first.succeeded(provider, policy)
    assert second.admit(provider, policy).go
    assert second.report([provider])[provider] == {"state": CLOSED, "consecutive_failures": 0}


def test_a_success_just_after_a_clean_admission_asks_redis_nothing(redis_server):
    """The hot path's common case costs one Redis read (the admission), not two; a
    failure heard in this process between them is not skipped over."""
    board, provider = redis_board(), f"p-{uuid.uuid4().hex[:8]}"
    shared = board.shared.client
    assert board.admit(provider, POLICY).go
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: any call is refused
        board.shared.client = redis.Redis(host="127.0.0.1", port=closed.getsockname()[1], socket_timeout=0.5)
        board.succeeded(provider, POLICY)
    assert board.redis_failed_at is None  # it did not ask

    board.shared.client = shared
    board.failed(provider, POLICY)
    board.succeeded(provider, POLICY)
    assert board.report([provider])[provider]["consecutive_failures"] == 0


def test_a_redis_that_does_not_answer_costs_one_short_timeout_and_never_a_call(redis_server):
    """A listener that takes connections and never answers, as a frozen Redis does:
    the first operation waits for the 0.5 s timeout, the next ones keep this
    process's own state without asking Redis again."""
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(64)
        client = redis.Redis(
            host="127.0.0.1", port=frozen.getsockname()[1], socket_connect_timeout=0.5, socket_timeout=0.5
        )
        board, provider = Board(client), "frozen-redis"
        started = time.monotonic()
        for _ in range(POLICY.allowed_fails):
            board.failed(provider, POLICY)
        decision = board.admit(provider, POLICY)
        report = board.report([provider])
        elapsed = time.monotonic() - started
    assert (decision.go, decision.reason) == (False, OPEN)
    assert report[provider]["state"] == OPEN
    assert elapsed < 0.5 + 0.5  # one timeout, then the process's own state
    assert board.redis_failed_at is not None


# --- the order of a route's backends -------------------------------------------------


def local(name: str) -> LocalRoute:
    return LocalRoute(Deployment(name=name, algorithm="algorithms.echo:Echo"), timeout_s=5)


def test_equals_share_by_weight_and_each_is_the_others_fallback():
    a, b, c = local("a"), local("b"), local("c")
    route = FallbackRoute("r", (Target(a, 1, 3.0), Target(b, 1, 1.0), Target(c, 2, 1.0)))
    rng = random.Random(15)
    plans = [route.plan(rng) for _ in range(4000)]
    assert all(plan[2] is c and {plan[0].name, plan[1].name} == {"a", "b"} for plan in plans)
    share = sum(plan[0] is a for plan in plans) / len(plans)
    assert 0.72 < share < 0.78  # 3 : 1
    assert [p.name for p in route.plan(random.Random(1))] == [p.name for p in route.plan(random.Random(1))]


def test_without_weights_the_list_is_the_order():
    route = FallbackRoute("r", tuple(Target(local(n), i, 1.0) for i, n in enumerate("xyz", start=1)))
    assert {tuple(p.name for p in route.plan(random.Random(seed))) for seed in range(50)} == {("x", "y", "z")}


def test_a_route_may_take_its_own_targets_name_and_lists_new_names_once(tmp_path):
    text = (
        "[[deployments]]\nname = 'local'\nalgorithm = 'algorithms.echo:Echo'\n"
        "[[upstreams]]\nname = 'g'\nbase_url = 'https://g.example/v1'\nmodels = ['m', 'n']\n"
        "prices = { m = { input = 1, output = 2 }, n = { input = 4, output = 1 } }\n"
        "[[routes]]\nname = 'local'\ntargets = ['local', 'm']\n"
        "[[routes]]\nname = 'any'\ntargets = [{ model = 'm', order = 1, weight = 3 }, { model = 'n', order = 1 }]\n"
    )
    config = parse_config(tomllib.loads(text), "f", tmp_path)
    assert config.model_names == ["local", "m", "n", "any"]
    route = route_model("any", config)
    assert isinstance(route, FallbackRoute)
    assert route.cost(1_000_000, 1_000_000) == pytest.approx(5.0)  # the dearest: what admission reserves
    assert isinstance(route_model("local", config), FallbackRoute)
    assert isinstance(route_local_model("local", config), LocalRoute)  # the seed's /api/ keeps the deployment


# --- real providers ---------------------------------------------------------------


class CountingRelay:
    """A TCP relay to `target_port` that counts the connections it accepts: each is
    a connection attempt the gateway made to the provider behind it. When nothing
    listens there, it closes the connection it took."""

    def __init__(self, port: int, target_port: int) -> None:
        self.target_port, self.accepts = target_port, 0
        self.listener = socket.create_server(("127.0.0.1", port))
        self.thread = threading.Thread(target=self.serve, name="counting-relay", daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed: the fixture is done
            self.accepts += 1
            threading.Thread(target=self.relay, args=(client,), daemon=True).start()

    def relay(self, client: socket.socket) -> None:
        try:
            provider = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
        except OSError:
            client.close()  # the provider is dead: the gateway sees a closed connection
            return
        provider.settimeout(None)
        pumps = [
            threading.Thread(target=pump, args=pair, daemon=True) for pair in ((client, provider), (provider, client))
        ]
        for thread in pumps:
            thread.start()

    def close(self) -> None:
        self.listener.close()


def pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@pytest.fixture(scope="module")
def relay(gateway) -> Iterator[CountingRelay]:
    counting = CountingRelay(gateway.relay_port, target_port=free_port())
    try:
        yield counting
    finally:
        counting.close()


CHUNK = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "scripted "}}]}
ANSWER = {
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "scripted"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class ScriptedProvider(BaseHTTPRequestHandler):
    """Answers as `script` says: `ok`, `too_many` (429, Retry-After: 2), `dies_before_first` (a
    stream's headers, then the connection closes) or `dies_after_first` (one event,
    then it closes); `calls` counts the requests it got."""

    script = "ok"
    calls = 0

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ScriptedProvider.calls += 1
        with contextlib.suppress(OSError):
            getattr(self, self.script.replace("-", "_"))(bool(body.get("stream")))

    def log_message(self, *args) -> None:  # quiet
        pass

    def head(self, status: int = 200, content_type: str = "application/json", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Connection", "close")
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()

    def ok(self, stream: bool) -> None:
        if not stream:
            body = json.dumps(ANSWER).encode()
            self.head(Content_Length=str(len(body)))
            self.wfile.write(body)
            return
        self.head(content_type="text/event-stream")
        self.wfile.write(f"data: {json.dumps(CHUNK)}\n\ndata: [DONE]\n\n".encode())

    def too_many(self, stream: bool) -> None:
        body = json.dumps({"error": {"message": "slow down", "code": "rate_limit_exceeded"}}).encode()
        self.head(429, Retry_After="2", Content_Length=str(len(body)))
        self.wfile.write(body)

    def dies_before_first(self, stream: bool) -> None:
        self.head(content_type="text/event-stream")  # and nothing more: the connection closes

    def dies_after_first(self, stream: bool) -> None:
        self.head(content_type="text/event-stream")
        self.wfile.write(f"data: {json.dumps(CHUNK)}\n\n".encode())


@pytest.fixture(scope="module")
def scripted(gateway) -> Iterator[type[ScriptedProvider]]:
    server = ThreadingHTTPServer(("127.0.0.1", gateway.scripted_port), ScriptedProvider)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="scripted-provider", daemon=True)
    thread.start()
    try:
        yield ScriptedProvider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def chat(gateway, key: str, model: str, *, stream: bool = False) -> requests.Response:
    body = {"model": model, "messages": MESSAGES, "stream": stream}
    reply = requests.post(
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
        stream=stream,
    )
    if reply.headers.get("Content-Type", "").startswith("text/event-stream"):
        reply.events = [line[len(b"data: ") :] for line in reply.iter_lines() if line.startswith(b"data: ")]
    return reply


def streamed_text(reply: requests.Response) -> str:
    assert reply.events[-1] == b"[DONE]", reply.events
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in reply.events[:-1])


def jobs_of(key: str) -> list[Job]:
    return list(Job.objects.filter(api_key=recorded(key)).order_by("created_at"))


def tried(jobs: list[Job]) -> list[tuple[str, int]]:
    return [(job.backend, job.tries) for job in jobs]


def scrape(gateway) -> dict[tuple[str, tuple], float]:
    """The gateway's metrics: (sample name, its labels sorted) -> value."""
    text = requests.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def provider_state(gateway, provider: str) -> dict:
    return requests.get(f"{gateway.url}/readyz", timeout=10).json()["providers"][provider]


@pytest.mark.faults
def test_a_dead_provider_is_skipped_once_its_breaker_opens_and_used_again_after_the_cooldown(
    gateway, relay, provider_key, make_key
):
    key = make_key()
    port = relay.target_port
    mortal = start_web(port)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/usage/", mortal)
        healthy = chat(gateway, key, "fb-pair")
        assert (healthy.status_code, healthy.json()["model"]) == (200, "fb-pair")
        assert tried(jobs_of(key)) == [("fb-relay", 1)]  # the first provider serves while it lives

        processes.stop(mortal, timeout_s=0)  # SIGTERM then SIGKILL: the first provider dies
        before = relay.accepts
        failing = [chat(gateway, key, "fb-pair") for _ in range(2)]  # fb-relay: allowed_fails = 2
        opened_at = relay.accepts
        skipping = [chat(gateway, key, "fb-pair") for _ in range(4)]
        assert relay.accepts == opened_at > before  # open: not one more connection attempt
        for reply in failing + skipping:
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == "one two three"
        assert tried(jobs_of(key)[1:]) == [("fb-live", 2)] * 2 + [("fb-live", 1)] * 4
        assert provider_state(gateway, "fb-relay")["state"] == OPEN
        assert provider_state(gateway, "fb-relay")["consecutive_failures"] == 2
        scraped = scrape(gateway)
        assert scraped[("dla_upstream_breaker_state", (("provider", "fb-relay"), ("state", "open")))] == 1
        assert scraped[("dla_upstream_consecutive_failures", (("provider", "fb-relay"),))] == 2
        assert (
            scraped[("dla_backend_skips_total", (("backend", "fb-relay"), ("model", "fb-pair"), ("reason", "open")))]
            >= 4
        )
        assert (
            scraped[
                ("dla_fallbacks_total", (("backend", "fb-relay"), ("code", "upstream_error"), ("model", "fb-pair")))
            ]
            >= 2
        )

        # After the cooldown one call probes it; still dead, it opens again at once.
        wait_until(lambda: provider_state(gateway, "fb-relay")["state"] == HALF_OPEN, RELAY_COOLDOWN_S + SLACK_S)
        assert chat(gateway, key, "fb-pair").status_code == 200
        assert tried(jobs_of(key)[-1:]) == [("fb-live", 2)]
        assert relay.accepts == opened_at + 1
        assert provider_state(gateway, "fb-relay")["state"] == OPEN

        mortal = start_web(port)  # back
        wait_for_http(f"http://127.0.0.1:{port}/api/usage/", mortal)
        wait_until(lambda: provider_state(gateway, "fb-relay")["state"] == HALF_OPEN, RELAY_COOLDOWN_S + SLACK_S)
        back = [chat(gateway, key, "fb-pair") for _ in range(2)]
        assert [reply.status_code for reply in back] == [200, 200]
        assert tried(jobs_of(key)[-2:]) == [("fb-relay", 1)] * 2  # the probe closed it
        assert provider_state(gateway, "fb-relay") == {"state": CLOSED, "consecutive_failures": 0}
    finally:
        processes.stop(mortal)
    assert all(job.status == Job.Status.SUCCEEDED for job in jobs_of(key))
    assert key_row(key).calls_used == len(jobs_of(key))


def test_a_429_with_retry_after_sends_the_call_on_and_skips_the_provider_that_long(
    gateway, scripted, provider_key, make_key
):
    key = make_key()
    scripted.script, scripted.calls = "too_many", 0
    replies = [chat(gateway, key, "fb-scripted-pair") for _ in range(3)]
    assert [reply.status_code for reply in replies] == [200] * 3
    assert scripted.calls == 1  # asked once; then skipped while its Retry-After runs
    assert tried(jobs_of(key)) == [("fb-live", 2), ("fb-live", 1), ("fb-live", 1)]
    assert provider_state(gateway, "fb-scripted")["retry_after_s"] > 0

    scripted.script = "ok"
    wait_until(lambda: "retry_after_s" not in provider_state(gateway, "fb-scripted"), 2 + SLACK_S)
    reply = chat(gateway, key, "fb-scripted-pair")
    assert reply.json()["choices"][0]["message"]["content"] == "scripted"
    assert (scripted.calls, tried(jobs_of(key)[-1:])) == (2, [("fb-scripted", 1)])


def test_a_stream_that_fails_before_its_first_event_falls_back(gateway, scripted, provider_key, make_key):
    key = make_key()
    scripted.script = "dies_before_first"
    reply = chat(gateway, key, "fb-scripted-pair", stream=True)
    assert reply.status_code == 200
    assert streamed_text(reply) == "one two three"
    assert {json.loads(e)["model"] for e in reply.events[:-1]} == {"fb-scripted-pair"}
    (job,) = jobs_of(key)
    assert (job.backend, job.tries, job.status) == ("fb-live", 2, Job.Status.SUCCEEDED)
    assert job.worker.startswith("web@")  # the web process that ran its upstream tries
    assert key_row(key).calls_used == 1


def test_a_stream_that_fails_after_its_first_event_ends_with_the_error_event(gateway, scripted, provider_key, make_key):
    key = make_key(max_calls=3)
    scripted.script = "dies_after_first"
    reply = chat(gateway, key, "fb-scripted-pair", stream=True)
    assert reply.status_code == 200
    first, last = (json.loads(e) for e in reply.events)
    assert first["choices"][0]["delta"]["content"] == "scripted "
    assert last["error"]["code"] == "upstream_error"
    (job,) = jobs_of(key)
    assert (job.backend, job.tries, job.status, job.refunded) == ("fb-scripted", 1, Job.Status.FAILED, True)
    row = key_row(key)
    assert (row.calls_used, row.tokens_used) == (0, 0)  # refunded, once
    (day,) = UsageDay.objects.filter(api_key=row)
    assert (day.requests, day.failed, day.refunded) == (1, 1, 1)


def test_a_local_deployment_serves_when_every_upstream_is_down(gateway, provider_key, make_key):
    key = make_key()
    plain = chat(gateway, key, "fb-local-last")
    assert plain.status_code == 200, plain.text
    assert (plain.json()["model"], plain.json()["choices"][0]["message"]["content"]) == (
        "fb-local-last",
        "one two three",
    )
    stream = chat(gateway, key, "fb-local-last", stream=True)
    assert streamed_text(stream) == "one two three"
    assert tried(jobs_of(key)) == [("local", 3), ("local", 3)]
    assert all(job.queue == "dla.device.cpu" and job.status == Job.Status.SUCCEEDED for job in jobs_of(key))
    assert all(job.worker and not job.worker.startswith("web@") for job in jobs_of(key))  # its device worker


@pytest.mark.parametrize(("model", "why"), [("fb-orphan", "no worker"), ("fb-missing", "its model failed to load")])
def test_an_upstream_serves_a_local_name_its_deployment_cannot_take(gateway, provider_key, make_key, model, why):
    key = make_key()
    reply = chat(gateway, key, model)
    assert reply.status_code == 200, f"{why}: {reply.text}"
    assert (reply.json()["model"], reply.json()["choices"][0]["message"]["content"]) == (model, "one two three")
    (job,) = jobs_of(key)
    assert (job.model, job.backend, job.tries, job.queue, job.status) == (
        model,
        "fb-live",
        2,
        "",
        Job.Status.SUCCEEDED,
    )


def test_a_route_whose_every_backend_cools_down_is_a_503_with_retry_after(gateway, make_key):
    key = make_key(max_calls=5)
    first = chat(gateway, key, "fb-gone-only")  # fb-gone: allowed_fails = 1
    assert (first.status_code, error_of(first)["code"]) == (502, "upstream_unreachable")
    second = chat(gateway, key, "fb-gone-only")
    assert (second.status_code, error_of(second)["code"]) == (503, "no_backend_available")
    assert 1 <= int(second.headers["Retry-After"]) <= 30
    assert tried(jobs_of(key)) == [("fb-gone", 1), ("fb-gone", 0)]
    assert all(job.refunded for job in jobs_of(key))
    assert key_row(key).calls_used == 0
