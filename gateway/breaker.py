"""Circuit breakers for upstream providers: a provider that keeps failing is skipped by
routes for a cool-down, and one that answered 429 or 503 with `Retry-After: N` is
skipped for N seconds, so their calls go straight to the next backend instead of
waiting for a failure again.

One breaker per provider, fed by every call to it (a route's or not):

- closed: calls go through; `allowed_fails` failures in a row, the first of them at
  most `fails_window_s` ago, open it (a success resets the count);
- open: routes skip the provider for `cooldown_s`;
- half-open: after the cool-down one call (in all the web processes together) probes
  it; its success closes the breaker, its failure opens it for another cool-down.

Only routes skip (a name with one provider has nowhere else to go, so its calls
still try it, and their outcomes count). The state is one Redis hash per provider,
changed in optimistic transactions on Redis's clock, so every web process agrees;
its client has the rate limiter's 0.5 s timeouts. When Redis cannot be reached each
process keeps its own state for a while instead: a breaker never fails a call.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from django.conf import settings

from djangollmapi.config import Upstream

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
PHASES = (CLOSED, OPEN, HALF_OPEN)
# A provider's Retry-After is honoured up to this long (a day-long one is a typo).
MAX_RETRY_AFTER_S = 3600.0
# After Redis failed, a process keeps its own state this long before asking it again,
# so an outage costs one timeout every few seconds, not one per call.
REDIS_RETRY_S = 5.0
WATCH_ATTEMPTS = 5
# A success after a reading that found the breaker clean (closed, no failures: what a
# success leaves) changes nothing: within this long of that reading, it is not read again.
CLEAN_READ_S = 1.0

T = TypeVar("T")


@dataclass(frozen=True)
class Policy:
    """A provider's breaker settings (`[[upstreams]]`), and how long a half-open probe
    may take before another call may probe instead: its connect and read timeouts."""

    allowed_fails: int
    window_s: float
    cooldown_s: float
    probe_s: float

    @classmethod
    def of(cls, upstream: Upstream) -> Policy:
        return cls(
            upstream.allowed_fails,
            upstream.fails_window_s,
            upstream.cooldown_s,
            upstream.connect_timeout_s + upstream.timeout_s,
        )


@dataclass(frozen=True)
class State:
    """One provider's breaker, as stored: times are seconds on the store's clock, 0 unset."""

    failures: int = 0  # in a row, since the last success
    first_failure: float = 0.0  # when that run of failures began
    open_until: float = 0.0  # set while open or half-open: open before it, half-open after
    probe_until: float = 0.0  # a half-open probe is out until then
    retry_until: float = 0.0  # the provider asked not to be called before then

    def phase(self, now: float) -> str:
        if not self.open_until:
            return CLOSED
        return OPEN if now < self.open_until else HALF_OPEN

    def fields(self) -> dict[str, str]:
        return {f.name: repr(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name)}

    @classmethod
    def from_fields(cls, raw: dict[Any, Any]) -> State:
        values = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        try:
            return cls(
                **{
                    name: (int(float(value)) if known[name] == "int" else float(value))
                    for name, value in values.items()
                    if name in known
                }
            )
        except ValueError:
            return cls()  # a garbled hash reads as a fresh breaker


@dataclass(frozen=True)
class Decision:
    """May a call try the provider now: `go` (a `probe` when half-open), or why not
    (`reason`: open, half_open, retry_after) and for how long."""

    go: bool
    probe: bool = False
    reason: str = ""
    wait_s: float = 0.0


GO = Decision(True)


# --- the state machine: pure functions of a state and the time -------------------


def decide(state: State, now: float, policy: Policy) -> tuple[Decision, State]:
    """Whether a call may try the provider, and the state after (a probe taken)."""
    if state.retry_until > now:
        return Decision(False, reason="retry_after", wait_s=state.retry_until - now), state
    phase = state.phase(now)
    if phase == OPEN:
        return Decision(False, reason=OPEN, wait_s=state.open_until - now), state
    if phase == HALF_OPEN:
        if state.probe_until > now:
            return Decision(False, reason=HALF_OPEN, wait_s=state.probe_until - now), state
        return Decision(True, probe=True), dataclasses.replace(state, probe_until=now + policy.probe_s)
    return GO, state


def after_failure(state: State, now: float, policy: Policy, retry_after_s: float | None = None) -> State:
    """A call to the provider failed (it could not be reached, timed out, answered 5xx,
    429, or garbage): count it, open the breaker at `allowed_fails` in a row or when a
    probe failed, and keep the provider's Retry-After."""
    retry_until = state.retry_until
    if retry_after_s:
        retry_until = max(retry_until, now + min(retry_after_s, MAX_RETRY_AFTER_S))
    failures, first = state.failures + 1, state.first_failure or now
    if state.phase(now) == CLOSED and now - first > policy.window_s:
        failures, first = 1, now  # the run began too long ago: this one starts a new one
    open_until, probe_until = state.open_until, state.probe_until
    phase = state.phase(now)
    if phase == HALF_OPEN or (phase == CLOSED and failures >= policy.allowed_fails):
        open_until, probe_until = now + policy.cooldown_s, 0.0
    return State(failures, first, open_until, probe_until, retry_until)


def after_success(state: State) -> State:
    """The provider answered: closed, the run of failures over (a Retry-After stands)."""
    return State(retry_until=state.retry_until)


def seconds_left(until: float, now: float) -> float:
    return max(0.0, until - now)


# --- where the states live ---------------------------------------------------------


def state_key(provider: str) -> str:
    return f"dla:breaker:{provider}"


class RedisStates:
    """The shared states: a hash per provider, on Redis's clock."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def read(self, providers: list[str]) -> tuple[list[State], float]:
        pipe = self.client.pipeline(transaction=False)
        for provider in providers:
            pipe.hgetall(state_key(provider))
        pipe.time()
        *raws, (seconds, micros) = pipe.execute()
        return [State.from_fields(raw) for raw in raws], seconds + micros / 1_000_000

    def change(self, provider: str, change: Callable[[State, float], tuple[T, State]], policy: Policy) -> T:
        """Apply `change` atomically (WATCH / MULTI, retried when another process wrote
        first); under a contention that outlasts the attempts its write is dropped."""
        key = state_key(provider)
        result: Any = None
        with self.client.pipeline() as pipe:
            for _ in range(WATCH_ATTEMPTS):
                try:
                    pipe.watch(key)
                    state = State.from_fields(pipe.hgetall(key))
                    seconds, micros = pipe.time()
                    now = seconds + micros / 1_000_000
                    result, new = change(state, now)
                    if new == state:
                        pipe.unwatch()
                        return result
                    pipe.multi()
                    pipe.delete(key)
                    if new != State():
                        pipe.hset(key, mapping=new.fields())
                        pipe.pexpire(key, math.ceil(keep_s(new, now, policy) * 1000))
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue
        log.warning("breaker of %s: too many concurrent changes; this one is dropped", provider)
        return result


def keep_s(state: State, now: float, policy: Policy) -> float:
    """How long a stored state matters: until its last deadline, and a cool-down more
    (so a half-open breaker nobody called for a long time ends up closed)."""
    last = max(state.first_failure + policy.window_s, state.open_until, state.probe_until, state.retry_until)
    return max(1.0, last - now) + policy.cooldown_s


class LocalStates:
    """This process's own states, while Redis cannot be reached."""

    def __init__(self) -> None:
        self.states: dict[str, State] = {}
        self.lock = threading.Lock()

    def read(self, providers: list[str]) -> tuple[list[State], float]:
        with self.lock:
            return [self.states.get(p, State()) for p in providers], time.time()

    def change(self, provider: str, change: Callable[[State, float], tuple[T, State]], policy: Policy) -> T:
        with self.lock:
            result, new = change(self.states.get(provider, State()), time.time())
            self.states[provider] = new
            return result


class Board:
    """Every provider's breaker: in Redis, or in this process while Redis is away."""

    def __init__(self, client: redis.Redis) -> None:
        self.shared = RedisStates(client)
        self.local = LocalStates()
        self.redis_failed_at: float | None = None
        # provider -> when (monotonic) a reading here (an admission's, a success's) last found it clean
        self.clean_at: dict[str, float] = {}

    def admit(self, provider: str, policy: Policy) -> Decision:
        """May a route's call try `provider` now (taking the half-open probe if it may)."""

        def change(state: State, now: float) -> tuple[Decision, State]:
            return decide(state, now, policy)

        (state,), now = self.run(lambda store: store.read([provider]))
        self.note_reading(provider, state)
        decision, new = decide(state, now, policy)
        if new == state:
            return decision
        return self.run(lambda store: store.change(provider, change, policy))

    def failed(self, provider: str, policy: Policy, retry_after_s: float | None = None) -> None:
        def change(state: State, now: float) -> tuple[None, State]:
            return None, after_failure(state, now, policy, retry_after_s)

        self.clean_at.pop(provider, None)
        self.run(lambda store: store.change(provider, change, policy))

    def succeeded(self, provider: str, policy: Policy) -> None:
        """Close the breaker's run of failures. The hot path's common case costs no
        Redis call: a success within CLEAN_READ_S of a reading that found the breaker
        clean (an admission's, or the last success's here). What it skips is resetting
        a count another process raised meanwhile; this process's own failures are
        never skipped over (a failure forgets the reading)."""

        def change(state: State, now: float) -> tuple[None, State]:
            return None, after_success(state)

        if time.monotonic() - self.clean_at.get(provider, -math.inf) < CLEAN_READ_S:
            return
        (state,), _now = self.run(lambda store: store.read([provider]))
        if after_success(state) != state:
            self.run(lambda store: store.change(provider, change, policy))
        self.clean_at[provider] = time.monotonic()

    def note_reading(self, provider: str, state: State) -> None:
        if after_success(state) == state:
            self.clean_at[provider] = time.monotonic()
        else:
            self.clean_at.pop(provider, None)

    def report(self, providers: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Each provider's state for /readyz and /metrics: its phase, failures in a
        row, and the seconds until it is tried again (open) or its Retry-After ends."""
        names = list(providers)
        states, now = self.run(lambda store: store.read(names))
        report = {}
        for name, state in zip(names, states, strict=True):
            entry: dict[str, Any] = {"state": state.phase(now), "consecutive_failures": state.failures}
            if entry["state"] == OPEN:
                entry["retry_in_s"] = round(seconds_left(state.open_until, now), 3)
            if state.retry_until > now:
                entry["retry_after_s"] = round(seconds_left(state.retry_until, now), 3)
            report[name] = entry
        return report

    def run(self, operation: Callable[[Any], T]) -> T:
        """`operation` on the shared store, or on this process's while Redis is away."""
        if self.redis_failed_at is None or time.monotonic() - self.redis_failed_at > REDIS_RETRY_S:
            try:
                result = operation(self.shared)
            except redis.RedisError as exc:
                if self.redis_failed_at is None:
                    log.warning("circuit breakers: Redis unreachable (%s); per-process states", type(exc).__name__)
                self.redis_failed_at = time.monotonic()
            else:
                if self.redis_failed_at is not None:
                    log.warning("circuit breakers: Redis is back; shared states again")
                    self.redis_failed_at = None
                return result
        return operation(self.local)


@functools.cache
def client() -> redis.Redis:
    """The breakers' pooled client, with the rate limiter's short timeouts."""
    timeout_s = settings.REDIS_SOCKET_TIMEOUT_S
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)


@functools.cache
def board() -> Board:
    """This process's board, over the shared client (built on first use, after fork)."""
    return Board(client())
