"""The circuit breakers that make a failing provider skipped (`gateway.breaker`): the
state machine as pure functions of a state and the time, and the board that keeps
the states in the real Redis, or in the process while Redis does not answer."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
import redis
from django.conf import settings

from gateway import breaker
from gateway.breaker import CLOSED, HALF_OPEN, OPEN, Board, Policy, State, after_failure, after_success, decide
from tests.helpers import wait_until

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
