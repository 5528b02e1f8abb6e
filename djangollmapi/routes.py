"""Which backend serves a model name: the one routing decision, made once per request.

A name is a local deployment (its device's worker runs it), an upstream provider's
model (the web process forwards it), or a route: several of those tried in turn
(`[[routes]]`, gateway.fallbacks). The config refuses a name used twice, except by a
route for one of its own targets. Anything else is a 404. Only a configured name
chooses the target; nothing else a client sends can (no SSRF).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from django.conf import settings

from djangollmapi.config import Deployment, LLMConfig, Upstream, UpstreamModel
from djangollmapi.errors import ApiError

OWNER = "djangollmapi"  # `owned_by` of every local model card
DEFAULT_MAX_NEW_TOKENS = 64  # TextGeneration's default cap when a deployment sets none


@dataclass(frozen=True)
class LocalRoute:
    """A deployment on one of our devices, with what a request needs to know of it."""

    deployment: Deployment
    timeout_s: float  # how long a client waits for one of its jobs
    owner = OWNER

    @property
    def name(self) -> str:
        return self.deployment.name

    @property
    def max_tokens(self) -> int:
        """The deployment's `max_new_tokens`: both the default and the cap of a
        request's `max_tokens`, as the key's token budget reserves exactly that."""
        value = self.deployment.options.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_NEW_TOKENS


@dataclass(frozen=True)
class UpstreamRoute:
    """A model of an upstream provider: the provider and its own name for the model."""

    upstream: Upstream
    model: UpstreamModel

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def provider(self) -> str:
        return self.upstream.name

    @property
    def owner(self) -> str:
        return self.upstream.name


Backend = LocalRoute | UpstreamRoute


@dataclass(frozen=True)
class Target:
    """One backend of a route, with its place in the order and its share among equals."""

    backend: Backend
    order: int
    weight: float


@dataclass(frozen=True)
class FallbackRoute:
    """A name served by several backends in turn (`[[routes]]`): the call goes to the
    first that takes it, the next when one fails before its answer started."""

    name: str
    targets: tuple[Target, ...]
    owner = OWNER

    def plan(self, rng: random.Random | None = None) -> list[Backend]:
        """Every target once, in the order to try them: by `order`, and within one
        order drawn by weight without replacement (a target of weight 3 comes first
        three times as often as one of weight 1), so equals share the load and each
        is the other's fallback."""
        rng = rng or random
        orders = sorted({t.order for t in self.targets})
        planned: list[Backend] = []
        for order in orders:
            equals = [t for t in self.targets if t.order == order]
            planned += [t.backend for t in weighted_shuffle(equals, rng)]
        return planned

    def local_backends(self) -> list[LocalRoute]:
        return [t.backend for t in self.targets if isinstance(t.backend, LocalRoute)]

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """The most any of its upstream models would cost (what admission reserves from
        a spend budget); None when none has a price."""
        costs = [
            t.backend.model.cost(prompt_tokens, completion_tokens)
            for t in self.targets
            if isinstance(t.backend, UpstreamRoute)
        ]
        priced = [c for c in costs if c is not None]
        return max(priced) if priced else None


def weighted_shuffle(targets: Sequence[Target], rng: random.Random) -> list[Target]:
    """Weighted random order without replacement (Efraimidis and Spirakis: sort by
    u ** (1 / weight), u uniform in (0, 1])."""
    return sorted(targets, key=lambda t: (1.0 - rng.random()) ** (1.0 / t.weight), reverse=True)


Route = LocalRoute | UpstreamRoute | FallbackRoute


def route_model(name: str, config: LLMConfig | None = None) -> Route:
    """The backend of `name` (an empty one means `[server] default_model`), or 404
    `model_not_found` for a name nobody serves. A route wins over the target whose
    name it takes."""
    config = config or settings.LLM_CONFIG
    name = name or config.server.default_model
    route = config.route(name)
    if route is not None:
        targets = (Target(backend_named(t.model, config), t.order, t.weight) for t in route.targets)
        return FallbackRoute(route.name, tuple(targets))
    return backend_named(name, config)


def backend_named(name: str, config: LLMConfig) -> Backend:
    """The deployment or upstream model called `name` itself, whatever route takes it."""
    deployment = config.deployment(name)
    if deployment is not None:
        return LocalRoute(deployment, config.job_timeout_for(deployment))
    found = config.upstream_for(name)
    if found is not None:
        return UpstreamRoute(*found)
    raise unknown_model(name)


def route_local_model(name: str, config: LLMConfig | None = None) -> LocalRoute:
    """For what only our own deployments do (the seed's `/api/`): the deployment of that
    name (a route's fallbacks do not apply there); an upstream name reads as unknown."""
    config = config or settings.LLM_CONFIG
    route = backend_named(name or config.server.default_model, config)
    if not isinstance(route, LocalRoute):
        raise unknown_model(name)
    return route


def unknown_model(name: str) -> ApiError:
    return ApiError(404, "model_not_found", f"The model {name!r} does not exist.", param="model")
