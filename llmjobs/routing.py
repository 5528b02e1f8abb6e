"""Which deployment serves a model name, and which queue serves a device.

One queue per device, one single-concurrency worker per queue: that is what keeps a
GPU from ever running two jobs at once.
"""

from __future__ import annotations

from django.conf import settings

from djangollmapi.config import Deployment
from djangollmapi.errors import ApiError

QUEUE_PREFIX = "dla.device."


def device_queue_name(device: str) -> str:
    return QUEUE_PREFIX + device.replace(":", "-")


def resolve_deployment(model: str | None) -> Deployment:
    """The deployment for a requested model name (the default when none is named)."""
    config = settings.LLM_CONFIG
    name = model or config.server.default_model
    deployment = config.deployment(name)
    if deployment is None:
        raise ApiError(404, "model_not_found", f"The model {name!r} does not exist.", param="model")
    return deployment


def deployments_on_device(device: str) -> list[Deployment]:
    return [d for d in settings.LLM_CONFIG.deployments if d.device == device]
