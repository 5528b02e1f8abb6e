"""The response cache (seed 002), opt-in per deployment or upstream (`cache_ttl_s`):
an identical deterministic `/v1` call (chat and completions at temperature 0, one
choice; embeddings) is answered from Redis without reaching the worker or the
provider, with `x-cache: hit`.

"Identical" is the request as parsed, normalised: the route, the endpoint and every
field that shapes the answer (not `user`, not the stream flags), hashed. Answers are
kept per key unless `cache_shared`; a hit is still a call (admission, quota, limits,
a Job row with backend `cache`, the cached usage charged) unless `cache_hits_count`
is false, when the call is given back. Streams are not cached. A cache that Redis
cannot read or write is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import redis

from djangollmapi.routes import FallbackRoute, LocalRoute, Route
from llmjobs import events
from llmjobs.models import Job

log = logging.getLogger(__name__)

# Fields that do not change an answer: who asks (`user`) and how it is delivered.
NOT_THE_QUESTION = {"user", "stream", "stream_options"}


@dataclass(frozen=True)
class Slot:
    """Where one call's answer is (or will be) cached, and for how long."""

    key: str
    ttl_s: float
    hits_count: bool


def slot_for(route: Route, kind: str, call: Any, key_prefix: str) -> Slot | None:
    """The call's cache slot, or None when its route caches nothing or the call is
    not deterministic (sampled, several choices, streamed)."""
    if isinstance(route, FallbackRoute):
        return None  # a route's answers are not cached (its backends' settings differ)
    config = route.deployment if isinstance(route, LocalRoute) else route.upstream
    if not config.cache_ttl_s or call.stream or not deterministic(kind, route, call):
        return None
    question = json.dumps([route.name, kind, normalised(route, call)], sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(question.encode()).hexdigest()
    scope = "shared" if config.cache_shared else key_prefix
    return Slot(f"dla:cache:{scope}:{digest}", config.cache_ttl_s, config.cache_hits_count)


def deterministic(kind: str, route: Route, call: Any) -> bool:
    if kind == Job.Kind.EMBEDDINGS:
        return True
    if isinstance(route, LocalRoute):
        return call.request.temperature == 0
    data = call.data
    return data.get("temperature") == 0 and data.get("n", 1) == 1


def normalised(route: Route, call: Any) -> Any:
    """What the answer depends on: a local call's parsed payload (defaults filled in),
    an upstream call's body as the provider would get it."""
    if isinstance(route, LocalRoute):
        payload = call.payload()
        request = payload.get("request") if isinstance(payload, dict) else None
        if isinstance(request, dict):
            return {k: v for k, v in request.items() if k not in NOT_THE_QUESTION}
        return payload
    return {k: v for k, v in call.data.items() if k not in NOT_THE_QUESTION and k != "model"}


def lookup(slot: Slot) -> dict | None:
    try:
        raw = events.redis_client().get(slot.key)
    except redis.RedisError as exc:
        log.warning("response cache unreadable (%s): a miss", type(exc).__name__)
        return None
    return json.loads(raw) if raw else None


def store(slot: Slot, answer: dict) -> None:
    """Keep an answer for `ttl_s` (a failed write only loses the next hit)."""
    try:
        events.redis_client().set(slot.key, json.dumps(answer, separators=(",", ":")), px=int(slot.ttl_s * 1000))
    except redis.RedisError as exc:
        log.warning("response cache unwritable (%s)", type(exc).__name__)


def usage_of(result: dict) -> tuple[int, int]:
    return int(result.get("prompt_tokens") or 0), int(result.get("completion_tokens") or 0)
