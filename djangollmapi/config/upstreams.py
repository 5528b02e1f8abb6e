"""`[[upstreams]]`: OpenAI-compatible providers behind our keys, their model names and
prices. A provider's secret is never in the file, only the name of the environment
variable that holds it."""

from __future__ import annotations

import os
import re
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from djangollmapi.config.types import (
    NAME_PATTERN,
    Name,
    NonNegative,
    Positive,
    PositiveSeconds,
    Section,
    invalid,
    toml_type,
)

ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HEADER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9-]+$")
# Set by the gateway itself or meaningless between two hops; never from the config.
RESERVED_HEADERS = {"authorization", "host", "content-length", "connection", "transfer-encoding", "te", "upgrade"}


class UpstreamModel(BaseModel):
    """A model name clients use, the provider's name for it, and its optional price in
    US dollars per million input / output tokens (for spend reports)."""

    model_config = ConfigDict(frozen=True)

    name: str
    upstream_name: str
    input_price: float | None = None
    output_price: float | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if self.input_price is None and self.output_price is None:
            return None
        return (prompt_tokens * (self.input_price or 0) + completion_tokens * (self.output_price or 0)) / 1_000_000


class Price(Section):
    input: NonNegative | None = None
    output: NonNegative | None = None


def upstream_models(raw: Any) -> Any:
    """`["a", "b"]` exposes the provider's names as they are; a table
    `{ "our-name" = "their-name" }` aliases them."""
    if isinstance(raw, list):
        pairs = [(item, item) for item in raw]
    elif isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        raise invalid("must be an array of model names or a table of aliases")
    if not pairs:
        raise invalid("must name at least one model")
    for ours, theirs in pairs:
        if not isinstance(ours, str) or not NAME_PATTERN.match(ours):
            raise invalid(f"{ours!r} is not a valid model name")
        if not isinstance(theirs, str) or not theirs or len(theirs) > 200:
            raise invalid(f"the provider's name for {ours!r} must be a non-empty string")
    return tuple(UpstreamModel(name=ours, upstream_name=theirs) for ours, theirs in pairs)


def header_pairs(raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise invalid(f"must be a table, got {toml_type(raw)}")
    for name, value in raw.items():
        if not HEADER_NAME_PATTERN.match(name) or name.lower() in RESERVED_HEADERS:
            raise invalid("is not a header this gateway may set", key=name)
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise invalid("must be a one-line string", key=name)
    return tuple(raw.items())


class Upstream(Section):
    """An OpenAI-compatible provider behind our keys. Its secret is read from the
    environment variable `api_key_env` when a request needs it, never from the file."""

    name: Name
    base_url: str
    models: Annotated[tuple[UpstreamModel, ...], BeforeValidator(upstream_models)] = Field(None, validate_default=True)
    api_key_env: str = ""
    prices: dict[str, Price] = Field(default_factory=dict)
    timeout_s: PositiveSeconds = 60.0
    connect_timeout_s: PositiveSeconds = 5.0
    # The answer's body, a whole stream included, must have arrived this long after
    # its headers (checked between reads, each of which waits at most timeout_s): a
    # provider that trickles bytes cannot hold a thread for ever.
    total_timeout_s: PositiveSeconds = 600.0
    # The most read of a plain answer (and kept of a stream's text), and of one line of
    # a stream; a provider that sends more is cut off (502), never held in memory.
    max_response_bytes: Positive = 8_388_608
    max_event_bytes: Positive = 1_048_576
    max_connections: Positive = 100
    headers: Annotated[tuple[tuple[str, str], ...], BeforeValidator(header_pairs)] = ()
    # Reserved from a key's token budget when a request names no max_tokens.
    reserve_tokens: Positive = 1024
    # The response cache for this provider's models (as on a deployment; absent: off).
    cache_ttl_s: PositiveSeconds | None = None
    cache_shared: bool = False
    cache_hits_count: bool = True
    # The circuit breaker (gateway.breaker): open after `allowed_fails` failures in a
    # row, the first of them at most `fails_window_s` ago; a route then skips the
    # provider for `cooldown_s`, after which one call probes it (half-open).
    allowed_fails: Positive = 3
    fails_window_s: PositiveSeconds = 60.0
    cooldown_s: PositiveSeconds = 30.0

    @field_validator("base_url")
    @classmethod
    def http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise invalid("must be an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise invalid("must not have a query or fragment")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def env_name(cls, value: str) -> str:
        if value and not ENV_NAME_PATTERN.match(value):
            raise invalid("must be the name of an environment variable")
        return value

    @model_validator(mode="after")
    def priced_models(self) -> Upstream:
        """`prices = { "our-name" = { input = 0.15, output = 0.60 } }`: dollars per 1M tokens."""
        names = {m.name for m in self.models}
        for name in self.prices:
            if name not in names:
                raise invalid("is not one of this upstream's models", key=f"prices.{name}")
        priced = tuple(
            m.model_copy(update={"input_price": self.prices[m.name].input, "output_price": self.prices[m.name].output})
            if m.name in self.prices
            else m
            for m in self.models
        )
        return self.model_copy(update={"models": priced})

    def model(self, name: str) -> UpstreamModel | None:
        return next((m for m in self.models if m.name == name), None)

    def secret(self) -> str:
        return os.environ.get(self.api_key_env, "") if self.api_key_env else ""
