"""`[[routes]]`: one model name served by several backends in turn. Each target is a
deployment or an upstream provider's model, by its name; a call goes to the first
that can take it and moves on to the next when a provider fails before its answer
started (gateway.fallbacks)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator

from djangollmapi.config.types import ModelName, Positive, Section, invalid, toml_type


class RouteTarget(Section):
    """One backend of a route: tried by `order` (lowest first; by default its place in
    the list), and among targets of equal order picked at random by `weight`."""

    model: ModelName
    order: Positive
    weight: Annotated[float, Field(gt=0)] = 1.0


def route_targets(raw: Any) -> Any:
    """`["a", "b"]` tries a, then b; a table `{ model = "a", order = 1, weight = 3 }`
    says more. A target's default `order` is its place in the list (1 for the first)."""
    if not isinstance(raw, list) or not raw:
        raise invalid("must be a non-empty array of model names or tables")
    targets = []
    for position, item in enumerate(raw, start=1):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict):
            raise invalid(f"must be a model name or a table, got {toml_type(item)}", key=f"[{position - 1}]")
        targets.append({"order": position, **item})
    return tuple(targets)


class RouteConfig(Section):
    """A name clients call and the backends that serve it, in turn."""

    name: ModelName
    targets: Annotated[tuple[RouteTarget, ...], BeforeValidator(route_targets)]

    @field_validator("targets")
    @classmethod
    def each_once(cls, targets: tuple[RouteTarget, ...]) -> tuple[RouteTarget, ...]:
        names = [t.model for t in targets]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise invalid(f"{name!r} is named twice", key=f"[{index}].model")
        return targets
