"""Which queue serves a device: one queue per device, one single-concurrency worker
per queue, which is what keeps a GPU from ever running two jobs at once. (Which
backend serves a model name is `djangollmapi.routes.route_model`.)"""

from __future__ import annotations

QUEUE_PREFIX = "dla.device."


def device_queue_name(device: str) -> str:
    return QUEUE_PREFIX + device.replace(":", "-")
