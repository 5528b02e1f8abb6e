"""What every table of the config shares: strict pydantic models, a few constrained
types, and the translation of a validation error into `<file>: <key>: <reason>`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from djangollmapi.dotted import dotted_key

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}$")

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, phrased as `file: key: reason`."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}")
        self.source, self.key, self.reason = source, key, reason


class Section(BaseModel):
    """A table of the file: exact types (no "5" for 5), no unknown keys, no inf or nan."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


def invalid(reason: str, key: str = "") -> PydanticCustomError:
    """A config error at the value being validated; `key` names a part below it
    (`"model_path"`, `"[2].name"`)."""
    return PydanticCustomError("config", reason, {"key": key} if key else None)


def as_tuple(value: Any) -> Any:
    """TOML arrays arrive as lists; the models keep immutable tuples."""
    return tuple(value) if isinstance(value, list) else value


def name_check(what: str) -> BeforeValidator:
    """A name clients or the operator use: letters, digits and `._:/-`, up to 100."""

    def check(value: Any) -> Any:
        if isinstance(value, str) and not NAME_PATTERN.match(value):
            raise invalid(f"{value!r} is not a valid {what}")
        return value

    return BeforeValidator(check)


def zero_means_unset(value: Any) -> Any:
    return None if value == 0 and not isinstance(value, bool) else value


Array = Annotated[tuple[T, ...], BeforeValidator(as_tuple)]
Positive = Annotated[int, Field(gt=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Name = Annotated[str, name_check("name")]
ModelName = Annotated[str, name_check("model name")]


def expand_path(value: str) -> Path:
    """`~` expanded; an unknown user or a NUL byte is the config's error, not a crash."""
    if "\x00" in value:
        raise invalid("must not contain a NUL character")
    try:
        return Path(value).expanduser()
    except RuntimeError as exc:
        raise invalid(f"cannot expand {value!r} ({exc})") from exc


def config_error(exc: ValidationError, source: str) -> ConfigError:
    """The first problem pydantic found, as the one line an operator reads; an unknown
    key (a typo, often the cause of the rest) before any other."""
    errors = exc.errors(include_url=False)
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    key = dotted_key(error["loc"], (error.get("ctx") or {}).get("key", ""))
    return ConfigError(source, key or "-", reason(error))


TYPE_NAMES = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "an array",
    "tuple_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
}
TOML_TYPES = {str: "str", int: "int", float: "float", bool: "bool", list: "array", dict: "table"}


def toml_type(value: Any) -> str:
    return TOML_TYPES.get(type(value), type(value).__name__)


def reason(error: dict[str, Any]) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in TYPE_NAMES:
        if isinstance(value, bool):
            return f"must be {TYPE_NAMES[kind]}, not a boolean"
        return f"must be {TYPE_NAMES[kind]}, got {toml_type(value)}"
    if kind == "greater_than":
        return "must be positive" if ctx.get("gt") == 0 else f"must be above {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return "must be 0 or more" if ctx.get("ge") == 0 else f"must be at least {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    return {
        "missing": "is required",
        "extra_forbidden": "unknown key",
        "finite_number": "must be a finite number",
    }.get(kind, error["msg"])
