"""The whole config (`LLMConfig`) and how it is read: the TOML file in force, the
environment's overrides, the embedded default when there is no file."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from djangollmapi.config.routes import RouteConfig
from djangollmapi.config.sections import (
    HARD_LIMIT_GRACE_S,
    CorsConfig,
    DatabaseSection,
    Deployment,
    JwtConfig,
    LimitsConfig,
    MetricsConfig,
    ServerConfig,
    UrlSection,
    WorkerConfig,
    default_deployments,
)
from djangollmapi.config.types import ConfigError, Section, config_error, invalid
from djangollmapi.config.upstreams import Upstream, UpstreamModel

CONFIG_ENV = "DJANGO_LLM_API_CONFIG"


def kombu_url(redis_url: str) -> str:
    """A redis-py URL as kombu (Celery's broker and result backend) spells it: a unix
    socket is `redis+socket://PATH` there, not `unix://PATH`."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


DATA_DIR_ENV = "DJANGO_LLM_API_DATA_DIR"
DEFAULT_CONFIG_PATH = "~/.djangollmapi"


def array_of_tables(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, list):
        raise invalid(f"must be an array of tables ([[{info.field_name}]])")
    return tuple(value)


class LLMConfig(Section):
    server: ServerConfig = Field(default_factory=dict, validate_default=True)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    redis: UrlSection = Field(default_factory=UrlSection)
    deployments: Annotated[tuple[Deployment, ...], BeforeValidator(array_of_tables)] = Field(
        default_factory=default_deployments, validate_default=True
    )
    upstreams: Annotated[tuple[Upstream, ...], BeforeValidator(array_of_tables)] = ()
    routes: Annotated[tuple[RouteConfig, ...], BeforeValidator(array_of_tables)] = ()
    cors: CorsConfig = Field(default_factory=CorsConfig)
    jwt: JwtConfig | None = None
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    _source: str = PrivateAttr("")
    # Django's settings object asks every value it hands out for `_mask_wrapped`; found
    # on the class, `settings.LLM_CONFIG` stays a plain read (~0.1 µs) instead of
    # pydantic's missing-attribute path (~5 µs), several times a request.
    _mask_wrapped: ClassVar[bool] = True

    @field_validator("deployments")
    @classmethod
    def resolved_deployments(cls, deployments: tuple[Deployment, ...], info: ValidationInfo) -> tuple:
        if not deployments:
            raise invalid("must be a non-empty array of tables")
        server = info.data.get("server")
        if server is None:
            return deployments
        resolved = []
        for index, deployment in enumerate(deployments):
            try:
                resolved.append(deployment.with_models_dir(server.data_dir / "models"))
            except PydanticCustomError as exc:
                raise invalid(exc.message(), key=f"[{index}].options.model_path") from None
        return tuple(resolved)

    @model_validator(mode="after")
    def one_name_one_target(self) -> LLMConfig:
        """One name, one target: a client must never be able to reach two."""
        seen: set[str] = set()
        for index, deployment in enumerate(self.deployments):
            if deployment.name in seen:
                raise invalid(f"{deployment.name!r} is used twice", key=f"deployments[{index}].name")
            seen.add(deployment.name)
        names = [u.name for u in self.upstreams]
        for index, upstream in enumerate(self.upstreams):
            if upstream.name in names[:index]:
                raise invalid(f"{upstream.name!r} is used twice", key=f"upstreams[{index}].name")
            for model in upstream.models:
                if model.name in seen:
                    raise invalid(f"{model.name!r} is already a model name", key=f"upstreams[{index}].models")
                seen.add(model.name)
        self.routes_name_known_targets(seen)
        default = self.server.default_model
        if not default:
            server = self.server.model_copy(update={"default_model": self.deployments[0].name})
            return self.model_copy(update={"server": server})
        if self.deployment(default) is None:
            raise invalid(f"no deployment named {default!r}", key="server.default_model")
        return self

    def routes_name_known_targets(self, backends: set[str]) -> None:
        """Every target of a route is a deployment or an upstream model (routes do not
        nest); a route's name is new, or the name of one of its own targets, which it
        then gives fallbacks."""
        named: set[str] = set()
        for index, route in enumerate(self.routes):
            for place, target in enumerate(route.targets):
                if target.model not in backends:
                    raise invalid(
                        f"no deployment or upstream model named {target.model!r}",
                        key=f"routes[{index}].targets[{place}].model",
                    )
            if route.name in named:
                raise invalid(f"{route.name!r} is used twice", key=f"routes[{index}].name")
            if route.name in backends and route.name not in {t.model for t in route.targets}:
                raise invalid(
                    f"{route.name!r} is already a model name (a route may take only one of its own targets' names)",
                    key=f"routes[{index}].name",
                )
            named.add(route.name)

    @property
    def source(self) -> str:
        return self._source

    @property
    def database_url(self) -> str:
        return self.database.url

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def models_dir(self) -> Path:
        return self.server.data_dir / "models"

    @property
    def embedded_redis(self) -> bool:
        """True when no Redis URL is configured: `serve` then starts one on a socket."""
        return not self.redis_url

    @property
    def redis_socket(self) -> Path:
        return self.server.data_dir / "redis.sock"

    @property
    def redis_client_url(self) -> str:
        """The URL redis-py connects to: the configured one or the embedded socket."""
        return self.redis_url or f"unix://{self.redis_socket}"

    @property
    def broker_url(self) -> str:
        """The same server spelled for kombu (`kombu_url`)."""
        return kombu_url(self.redis_client_url)

    @property
    def devices(self) -> list[str]:
        """Each device once, in config order (a deployment's replicas each): one queue
        each, and a worker on every host that serves it."""
        return list(dict.fromkeys(device for d in self.deployments for device in d.devices))

    def deployment(self, name: str) -> Deployment | None:
        return next((d for d in self.deployments if d.name == name), None)

    def deployments_on(self, device: str) -> list[Deployment]:
        return [d for d in self.deployments if device in d.devices]

    def upstream_for(self, model: str) -> tuple[Upstream, UpstreamModel] | None:
        """The provider serving `model` and its entry there, or None (local or unknown)."""
        for upstream in self.upstreams:
            entry = upstream.model(model)
            if entry is not None:
                return upstream, entry
        return None

    def route(self, name: str) -> RouteConfig | None:
        """The route called `name`: it wins over a deployment or upstream model of that name."""
        return next((r for r in self.routes if r.name == name), None)

    @property
    def model_names(self) -> list[str]:
        """Every name a client may ask for: local deployments, upstream models, then the
        routes' own new names."""
        names = [d.name for d in self.deployments] + [m.name for u in self.upstreams for m in u.models]
        return names + [r.name for r in self.routes if r.name not in names]

    def job_timeout_for(self, deployment: Deployment) -> float:
        """How long a client waits for a job of this deployment."""
        return deployment.timeout_s or self.server.job_timeout_s

    def job_time_limits(self, deployment: Deployment) -> tuple[float, float]:
        """(soft, hard) seconds a job may run in the worker: its deployment's timeout, as
        nobody waits longer for it, capped by `[worker] time_limit_s`. The soft limit
        stops a job between steps; the hard one kills a job that ignores it."""
        hard_cap = self.worker.time_limit_s
        soft = min(self.job_timeout_for(deployment), hard_cap)
        return soft, min(soft + HARD_LIMIT_GRACE_S, hard_cap)


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH).expanduser()


def load_config(path: Path | None = None) -> LLMConfig:
    """Read the config in force: `path`, else `$DJANGO_LLM_API_CONFIG`, else the default."""
    path = path or config_path()
    explicit = path != Path(DEFAULT_CONFIG_PATH).expanduser()
    if path.exists():
        raw, source = read_toml(path), str(path)
    elif explicit:
        raise ConfigError(str(path), "-", "file not found (set by $" + CONFIG_ENV + ")")
    else:
        raw, source = {}, "<embedded default>"
    return parse_config(raw, source, base_dir=path.parent.resolve())


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "-", f"not valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "-", "not UTF-8 text") from exc
    except OSError as exc:
        raise ConfigError(str(path), "-", f"cannot read ({exc.strerror})") from exc


# (environment variable, table, key): the environment wins over the file.
ENV_OVERRIDES = (
    (DATA_DIR_ENV, "server", "data_dir"),
    ("DJANGO_SECRET_KEY", "server", "secret_key"),
    ("DATABASE_URL", "database", "url"),
    ("REDIS_URL", "redis", "url"),
    ("DLA_NODE", "worker", "node"),
)


def with_env_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    raw = dict(raw)
    for variable, table, key in ENV_OVERRIDES:
        value = os.environ.get(variable)
        if value and isinstance(raw.get(table, {}), dict):
            raw[table] = {**raw.get(table, {}), key: value}
    return raw


def parse_config(raw: dict[str, Any], source: str, base_dir: Path) -> LLMConfig:
    """Validate the parsed TOML into typed config; the first error names its key."""
    try:
        config = LLMConfig.model_validate(with_env_overrides(raw), context={"base_dir": base_dir})
    except ValidationError as exc:
        raise config_error(exc, source) from None
    config._source = source
    return config
