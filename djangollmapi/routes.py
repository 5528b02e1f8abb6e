"""Which backend serves a model name: the one routing decision, made once per request.

A name is a local deployment (its device's worker runs it) or an upstream provider's
model (the web process forwards it), never both: the config refuses a name used twice.
Anything else is a 404. Only a configured name chooses the target; nothing else a
client sends can (no SSRF).
"""

from __future__ import annotations

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


Route = LocalRoute | UpstreamRoute


def route_model(name: str, config: LLMConfig | None = None) -> Route:
    """The backend of `name` (an empty one means `[server] default_model`), or 404
    `model_not_found` for a name nobody serves."""
    config = config or settings.LLM_CONFIG
    name = name or config.server.default_model
    deployment = config.deployment(name)
    if deployment is not None:
        return LocalRoute(deployment, config.job_timeout_for(deployment))
    found = config.upstream_for(name)
    if found is not None:
        return UpstreamRoute(*found)
    raise unknown_model(name)


def route_local_model(name: str, config: LLMConfig | None = None) -> LocalRoute:
    """For what only our own deployments do (the seed's `/api/`): an upstream name
    reads as unknown there."""
    route = route_model(name, config)
    if not isinstance(route, LocalRoute):
        raise unknown_model(name)
    return route


def unknown_model(name: str) -> ApiError:
    return ApiError(404, "model_not_found", f"The model {name!r} does not exist.", param="model")
