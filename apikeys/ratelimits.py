"""Per-key rate limits, exact across every web process: requests per minute and tokens
per minute as GCRA buckets, requests in flight as a set with expiries, for the key
and optionally per model, all checked and taken by ONE Lua script in Redis per call
(so two processes never both take the last slot), on Redis's own clock.

Admission runs inside the transaction that takes the call (`llmjobs.lifecycle`): a
refusal raises 429 `rate_limit_exceeded` and rolls the call back. A call's token
reservation (its `max_tokens` plus its prompt, bounded from its length) is replaced
by what it used when the job ends (`settle`), which also frees its place in flight.
A key without limits costs no Redis round trip.

GCRA ("generic cell rate algorithm"): a bucket of `limit` units refilled evenly over a
minute; it stores one time (the theoretical arrival time), a burst of `limit` calls
passes at once, and then one per `60 s / limit`. `Retry-After` is exact: when the
bucket has room again.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import redis
from django.conf import settings

from djangollmapi.errors import ApiError

log = logging.getLogger(__name__)

PERIOD_MS = 60_000
# A place in flight outlives a job that never ends (its process died) by this long at most.
IN_FLIGHT_MARGIN_S = 60


@dataclass(frozen=True)
class Limit:
    """One limit to check: `kind` r (requests/min), t (tokens/min), p (in flight)."""

    kind: str
    key: str
    limit: int
    scope: str  # "key" or the model's name, for the message


@dataclass
class Admission:
    """What admission decided: whether the job must settle its limits when it ends, and
    the OpenAI headers the response carries."""

    limited: bool = False
    headers: dict[str, str] = field(default_factory=dict)


# KEYS: one per limit. ARGV: job id, in-flight ttl ms, then per limit: kind, limit, cost.
# Returns {refused (0/1), retry_ms, index of the refusing limit (0 none), then per
# limit: remaining, reset_ms}. Checks every limit before taking any.
ADMIT_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local member, ttl = ARGV[1], tonumber(ARGV[2])
local period = 60000
local refused, retry, culprit = 0, 0, 0
local taken, out = {}, {}
for i = 1, #KEYS do
  local kind, limit, cost = ARGV[3 * i], tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  if kind == 'p' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local busy = redis.call('ZCARD', KEYS[i])
    if busy >= limit then
      refused, culprit = 1, (culprit > 0 and culprit or i)
      retry = math.max(retry, 1000)
      out[2 * i - 1], out[2 * i] = 0, 0
    else
      out[2 * i - 1], out[2 * i] = limit - busy - 1, 0
    end
  else
    local interval = period / limit
    local tat = tonumber(redis.call('HGET', KEYS[i], 't') or now)
    if tat < now then tat = now end
    local new = tat + math.min(cost, limit) * interval
    if new - now > period then
      refused, culprit = 1, (culprit > 0 and culprit or i)
      retry = math.max(retry, new - now - period)
      out[2 * i - 1], out[2 * i] = math.max(0, math.floor((period - (tat - now)) / interval)), math.ceil(tat - now)
    else
      taken[i] = {new, interval}
      out[2 * i - 1], out[2 * i] = math.floor((period - (new - now)) / interval), math.ceil(new - now)
    end
  end
end
if refused == 0 then
  for i = 1, #KEYS do
    if ARGV[3 * i] == 'p' then
      redis.call('ZADD', KEYS[i], now + ttl, member)
      redis.call('PEXPIRE', KEYS[i], ttl)
    else
      redis.call('HSET', KEYS[i], 't', taken[i][1], 'i', taken[i][2])
      redis.call('PEXPIRE', KEYS[i], math.ceil(taken[i][1] - now) + period)
    end
  end
end
local reply = {refused, math.ceil(retry), culprit}
for _, value in ipairs(out) do table.insert(reply, value) end
return reply
"""

# KEYS: token buckets, then in-flight sets. ARGV: number of token buckets, the token
# delta (used - reserved), the job id. A bucket or set that expired meanwhile is skipped.
SETTLE_LUA = """
local buckets, delta, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for i = 1, #KEYS do
  if i <= buckets then
    local values = redis.call('HMGET', KEYS[i], 't', 'i')
    if values[1] and delta ~= 0 then
      redis.call('HSET', KEYS[i], 't', tonumber(values[1]) + delta * tonumber(values[2]))
    end
  else
    redis.call('ZREM', KEYS[i], member)
  end
end
return 1
"""


@functools.cache
def client() -> redis.Redis:
    """The limiter's own pooled client, with short timeouts: a Redis that is down or
    frozen is a 503 (or, `fail_open`, a pass) within a second, never a hang."""
    timeout_s = settings.REDIS_SOCKET_TIMEOUT_S
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)


@functools.cache
def script(source: str) -> Any:
    """A Lua script run by its SHA (EVALSHA), loaded again by redis-py when Redis lost it."""
    return client().register_script(source)


def effective(own: int | None, default: int | None) -> int | None:
    return own if own is not None else default


def limits_for(call: Any, model: str) -> list[Limit]:
    """The key's limits (its own, else [limits]'), then the key's limits for `model`."""
    defaults = settings.LLM_CONFIG.limits
    key = f"dla:rl:{call.key_id}"
    found = []
    for kind, own, default in (
        ("r", call.rpm, defaults.rpm),
        ("t", call.tpm, defaults.tpm),
        ("p", call.max_parallel, defaults.max_parallel),
    ):
        limit = effective(own, default)
        if limit:
            found.append(Limit(kind, f"{key}:{kind}", limit, "key"))
    per_model = (call.model_limits or {}).get(model) or {}
    for kind, name in (("r", "rpm"), ("t", "tpm"), ("p", "max_parallel")):
        if per_model.get(name):
            found.append(Limit(kind, f"{key}:m:{model}:{kind}", per_model[name], model))
    return found


def admit(call: Any, model: str, job_id: str, tokens: int) -> Admission:
    """Check and take every limit of the call at once, `tokens` (the call's reservation,
    `llmjobs.admission.reservation`) of its tokens per minute; 429 with `Retry-After`
    when one is reached. Redis unreachable: 503, or a pass with `[limits] fail_open`."""
    limits = limits_for(call, model)
    if not limits:
        return Admission()
    ttl_ms = int((settings.LLM_CONFIG.worker.time_limit_s + IN_FLIGHT_MARGIN_S) * 1000)
    args: list[Any] = [job_id, ttl_ms]
    for limit in limits:
        args += [limit.kind, limit.limit, tokens if limit.kind == "t" else 1]
    try:
        reply = script(ADMIT_LUA)(keys=[limit.key for limit in limits], args=args)
    except redis.RedisError as exc:
        return unchecked(exc)
    refused, retry_ms, culprit = (int(value) for value in reply[:3])
    states = [(int(reply[3 + 2 * i]), int(reply[4 + 2 * i])) for i in range(len(limits))]
    headers = openai_headers(limits, states)
    if refused:
        raise refusal(limits[culprit - 1], retry_ms, headers)
    return Admission(limited=True, headers=headers)


def unchecked(exc: Exception) -> Admission:
    if settings.LLM_CONFIG.limits.fail_open:
        log.warning(
            "rate limits NOT enforced for this call: Redis unreachable (%s); [limits] fail_open = true",
            type(exc).__name__,
        )
        return Admission()
    log.error("rate limits cannot be checked: Redis unreachable (%s); refusing (fail closed)", type(exc).__name__)
    raise ApiError(
        503,
        "rate_limits_unavailable",
        "Rate limits cannot be checked right now; retry later.",
        headers={"Retry-After": "1"},
    )


KIND_NAMES = {"r": "requests per minute", "t": "tokens per minute", "p": "requests in flight"}


def refusal(limit: Limit, retry_ms: int, headers: dict[str, str]) -> ApiError:
    scope = "this API key" if limit.scope == "key" else f"this API key on the model {limit.scope!r}"
    wait = duration(retry_ms)
    message = f"Rate limit reached: {limit.limit} {KIND_NAMES[limit.kind]} for {scope}; retry in {wait}."
    retry_headers = {"Retry-After": str(max(1, math.ceil(retry_ms / 1000))), "retry-after-ms": str(retry_ms)}
    return ApiError(429, "rate_limit_exceeded", message, headers={**headers, **retry_headers})


def openai_headers(limits: list[Limit], states: list[tuple[int, int]]) -> dict[str, str]:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` as OpenAI sends them,
    from the tightest limit of each kind (the one with the least remaining)."""
    headers: dict[str, str] = {}
    for kind, name in (("r", "requests"), ("t", "tokens")):
        candidates = [(state, limit) for limit, state in zip(limits, states, strict=True) if limit.kind == kind]
        if not candidates:
            continue
        (remaining, reset_ms), limit = min(candidates, key=lambda c: c[0][0])
        headers[f"x-ratelimit-limit-{name}"] = str(limit.limit)
        headers[f"x-ratelimit-remaining-{name}"] = str(remaining)
        headers[f"x-ratelimit-reset-{name}"] = duration(reset_ms)
    return headers


def duration(ms: int) -> str:
    """OpenAI's (Go's) duration spelling: `17ms`, `1s`, `2.5s`, `6m0s`."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m" + (f"{rest:.3f}".rstrip("0").rstrip(".") or "0") + "s"


def settle(key_id: int, model: str, job_id: str, token_delta: int, release: bool) -> None:
    """A rate-limited job ended (or, `release` False, only its tokens were counted):
    correct its token reservation by `token_delta` (used - reserved) in the key's and
    the model's buckets, and free its place in flight. Best effort: a Redis that is
    gone loses only this correction (the bucket refills within a minute)."""
    base = f"dla:rl:{key_id}"
    buckets = [f"{base}:t", f"{base}:m:{model}:t"]
    in_flight = [f"{base}:p", f"{base}:m:{model}:p"] if release else []
    try:
        script(SETTLE_LUA)(keys=buckets + in_flight, args=[len(buckets), token_delta, job_id])
    except redis.RedisError as exc:
        log.warning("rate limits of job %s not settled: Redis unreachable (%s)", job_id, type(exc).__name__)


def key_limits_text(api_key: Any) -> str:
    """A key's rate limits in force, for the admin: its own, else the defaults."""
    defaults = settings.LLM_CONFIG.limits
    parts = []
    for name, own, default in (
        ("rpm", api_key.rpm, defaults.rpm),
        ("tpm", api_key.tpm, defaults.tpm),
        ("in flight", api_key.max_parallel, defaults.max_parallel),
    ):
        limit = effective(own, default)
        parts.append(f"{name} {limit if limit else '∞'}")
    per_model = "; ".join(f"{model}: {limits}" for model, limits in (api_key.model_limits or {}).items())
    budgets = "; ".join(f"{period} {limits}" for period, limits in (api_key.budgets or {}).items())
    return (
        ", ".join(parts)
        + (f"; per model {per_model}" if per_model else "")
        + (f"; budgets {budgets}" if budgets else "")
    )
