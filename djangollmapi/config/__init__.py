"""The one settings loader: a TOML file read into typed models (pydantic), environment
overrides for secrets, and the embedded default when no file exists.

It is read before Django is set up (settings import it), by `serve`, `runworker` and
gunicorn's config file, so it imports nothing of Django. A broken file fails at start
with `<file>: <key>: <reason>`, never later at request time. What is derived from the
config (the bind address, gunicorn's connection cap, Celery's soft limit, a job's time
limits) is computed here, once, on the models.
"""

from djangollmapi.config.loader import CONFIG_ENV, DATA_DIR_ENV, LLMConfig, load_config, parse_config
from djangollmapi.config.routes import RouteConfig, RouteTarget
from djangollmapi.config.sections import (
    DEFAULT_WEB_THREADS,
    DEFAULT_WEB_WORKERS,
    DEVICE_PATTERN,
    CorsConfig,
    Deployment,
    JwtConfig,
    ServerConfig,
    WorkerConfig,
)
from djangollmapi.config.types import ConfigError
from djangollmapi.config.upstreams import Upstream, UpstreamModel

__all__ = [
    "CONFIG_ENV",
    "DATA_DIR_ENV",
    "DEFAULT_WEB_THREADS",
    "DEFAULT_WEB_WORKERS",
    "DEVICE_PATTERN",
    "ConfigError",
    "CorsConfig",
    "Deployment",
    "JwtConfig",
    "LLMConfig",
    "RouteConfig",
    "RouteTarget",
    "ServerConfig",
    "Upstream",
    "UpstreamModel",
    "WorkerConfig",
    "load_config",
    "parse_config",
]
