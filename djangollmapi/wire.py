"""Typed request bodies: the base every endpoint's body model shares (pydantic, read
strictly: a wrong type is an error, never coerced) and the one translation of a
validation error into the client's 400, whose `param` is the error's location
(`messages[0].role`).

Pure: no settings, no database, no Redis. Limits that come from the config reach the
validators through the validation context (`{"max_input_chars": ...}`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from djangollmapi.dotted import dotted_key
from djangollmapi.errors import ApiError

M = TypeVar("M", bound="WireModel")

# A custom error's message may name its field: the place is only known at the end.
PARAM = "{param}"
INVALID_BODY = ("invalid_body", "The body must be a JSON object.")
UNKNOWN_PROBLEM = ("invalid_value", f"The parameter '{PARAM}' is not valid.")


class WireModel(BaseModel):
    """A JSON object from a client. Unknown fields are ignored (as OpenAI does) and a
    top-level `null` counts as absent."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    # The fields whose problems are reported before any other's (a body's input before
    # its options, say), whatever their order in the class.
    REPORT_FIRST: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def nulls_are_absent(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise wire_error(*INVALID_BODY)
        if None in data.values():
            return {name: value for name, value in data.items() if value is not None}
        return data


class documented:
    """JSON Schema keywords added to a field's schema for the OpenAPI docs (what our own
    validators check, which pydantic cannot see). Validation is untouched."""

    def __init__(self, **keywords: Any) -> None:
        self.keywords = keywords

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(schema), **self.keywords}


def wire_error(code: str, message: str, at: str = "") -> PydanticCustomError:
    """A validator's refusal: `code` is the client's error code; `{param}` in the
    message becomes the field's location, `at` a part below it (`"[2]"`, `"a.b"`)."""
    return PydanticCustomError(code, message, {"client_code": code, "at": at})


def storable_text(text: str) -> bool:
    """NUL and lone surrogates are valid in JSON strings but in no database column."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def storable_copy(value: Any) -> Any:
    """`value` with every string made storable (NUL and lone surrogates become U+FFFD):
    for what a model produced, which no request check has seen. Its client gets the
    exact output; the row keeps this faithful copy."""
    if isinstance(value, str):
        if storable_text(value):
            return value
        # Through UTF-16, a lone surrogate decodes as U+FFFD (UTF-8 would make it "?").
        text = value.replace("\x00", REPLACEMENT)
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {key: storable_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [storable_copy(item) for item in value]
    return value


REPLACEMENT = "\ufffd"


def storable(text: str, at: str = "") -> str:
    """`text`, or the refusal of one no database column can hold (`at` as in wire_error);
    each endpoint names it through its messages (`unstorable_text`)."""
    if not storable_text(text):
        message = f"The parameter '{PARAM}' must be valid Unicode without NUL characters."
        raise wire_error("unstorable_text", message, at)
    return text


def over_input_limit(chars: int, info: ValidationInfo) -> int | None:
    """The `max_input_chars` of the validation context when `chars` is over it."""
    limit = (info.context or {}).get("max_input_chars")
    return limit if limit is not None and chars > limit else None


StorableStr = Annotated[str, AfterValidator(storable)]


def parse_body(model: type[M], data: Any, messages: Mapping[str, tuple[str, str]], **context: Any) -> M:
    """`data` as `model`, or the ApiError 400 for its first problem. `messages` maps a
    pydantic error type (`missing`, `string_type`, ... or a validator's own code) to the
    endpoint's (code, message); `{param}` in a message is the error's location."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise client_error(first_error(exc.errors(include_url=False), model), messages) from None


def first_error(errors: list[Any], model: type[WireModel]) -> Any:
    """The problem to report: the first in the model's REPORT_FIRST fields, else the first."""
    rank = {name: index for index, name in enumerate(model.REPORT_FIRST)}
    return min(errors, key=lambda error: rank.get(error["loc"][0] if error["loc"] else "", len(rank)))


def client_error(error: Mapping[str, Any], messages: Mapping[str, tuple[str, str]]) -> ApiError:
    ctx = error.get("ctx") or {}
    param = param_of(error["loc"], ctx.get("at", ""))
    kind = error["type"]
    if kind == INVALID_BODY[0] or (param is None and kind in ("model_type", "dict_type")):
        return ApiError(400, *INVALID_BODY)
    ours = "client_code" in ctx
    fallback = (kind, error["msg"]) if ours else UNKNOWN_PROBLEM
    code, message = messages.get(f"{kind}:{param}") or messages.get(kind) or fallback
    return ApiError(400, code, message.replace(PARAM, param or ""), param=param)


def param_of(loc: tuple[str | int, ...], below: str = "") -> str | None:
    """The `param` of an error at `loc`; None for the body itself."""
    return dotted_key(loc, below) or None
