"""Turn a deployment's algorithm spec into a loaded instance.

A spec is ``"package.module:ClassName"``, or just ``"package.module"`` for a module that
exposes a class named ``Algorithm`` (the shape of the seed's ``tbg_llm_example``).
Every failure is an :class:`AlgorithmLoadError` naming the spec and the reason, because
the operator reads it in a worker log or at config check time, far from the code.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

DEFAULT_CLASS_NAME = "Algorithm"

_NAMED_PARAMETER_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class AlgorithmLoadError(Exception):
    """An algorithm spec could not be turned into a working instance."""

    def __init__(self, spec: str, reason: str) -> None:
        self.spec = spec
        self.reason = reason
        super().__init__(f"cannot load algorithm {spec!r}: {reason}")


def load_algorithm_class(spec: str) -> type:
    """Import the class named by ``spec`` and check that it looks like an algorithm."""
    module_name, attribute_path = _split_spec(spec)
    module = _import_module(spec, module_name)
    candidate = _resolve_attribute(spec, module, attribute_path)
    _check_is_algorithm_class(spec, candidate)
    return candidate


def build_algorithm(spec: str, device: str = "cpu", options: Mapping[str, Any] | None = None) -> object:
    """Load the class named by ``spec`` and instantiate it for ``device`` with ``options``.

    ``device`` and each option are passed only if the constructor accepts them, so a
    no-argument class loads unchanged for a cpu deployment with no options. Anything
    the constructor cannot take is an error rather than silently dropped: a dropped
    ``device="cuda:1"`` would put the model on the wrong hardware.
    """
    algorithm_class = load_algorithm_class(spec)
    kwargs = _constructor_kwargs(spec, algorithm_class, device, dict(options or {}))
    try:
        return algorithm_class(**kwargs)
    except Exception as exc:
        raise AlgorithmLoadError(spec, f"constructor failed: {type(exc).__name__}: {exc}") from exc


def is_cpu_device(device: str) -> bool:
    """True for ``"cpu"`` and ``"cpu:N"``: the devices a device-less class can serve."""
    return device == "cpu" or device.startswith("cpu:")


def _split_spec(spec: str) -> tuple[str, str]:
    module_name, _, attribute_path = spec.strip().partition(":")
    if ":" in spec and not attribute_path:
        raise AlgorithmLoadError(spec, "nothing after ':'; expected 'package.module:ClassName'")
    attribute_path = attribute_path or DEFAULT_CLASS_NAME
    names = [*module_name.split("."), *attribute_path.split(".")]
    if not all(name.isidentifier() for name in names):
        raise AlgorithmLoadError(spec, "malformed spec; expected 'package.module:ClassName' or 'package.module'")
    return module_name, attribute_path


def _import_module(spec: str, module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise AlgorithmLoadError(spec, f"module {module_name!r} not found") from exc
        raise AlgorithmLoadError(spec, f"module {module_name!r} needs {exc.name!r}, which is not installed") from exc
    except Exception as exc:
        raise AlgorithmLoadError(spec, f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from exc


def _resolve_attribute(spec: str, module: Any, attribute_path: str) -> Any:
    found = module
    for name in attribute_path.split("."):
        if not hasattr(found, name):
            raise AlgorithmLoadError(spec, f"{module.__name__!r} has no attribute {attribute_path!r}")
        found = getattr(found, name)
    return found


def _check_is_algorithm_class(spec: str, candidate: Any) -> None:
    if not inspect.isclass(candidate):
        raise AlgorithmLoadError(spec, f"{candidate!r} is not a class")
    if not callable(getattr(candidate, "run", None)):
        raise AlgorithmLoadError(spec, f"class {candidate.__qualname__} has no callable 'run'")


def _constructor_kwargs(spec: str, algorithm_class: type, device: str, options: dict[str, Any]) -> dict[str, Any]:
    parameters = _constructor_parameters(algorithm_class)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = {name for name, p in parameters.items() if p.kind in _NAMED_PARAMETER_KINDS}
    class_name = algorithm_class.__qualname__

    def accepts(name: str) -> bool:
        return accepts_any or name in accepted

    if "device" in options:
        raise AlgorithmLoadError(spec, "'device' is set by the deployment, not as an option")
    kwargs: dict[str, Any] = {}
    if accepts("device"):
        kwargs["device"] = device
    elif not is_cpu_device(device):
        raise AlgorithmLoadError(spec, f"{class_name}() takes no 'device' argument, so it cannot run on {device!r}")
    unknown = [name for name in options if not accepts(name)]
    if unknown:
        raise AlgorithmLoadError(spec, f"{class_name}() does not accept option(s): {', '.join(sorted(unknown))}")
    kwargs.update(options)
    _check_required_parameters(spec, class_name, parameters, kwargs)
    return kwargs


def _constructor_parameters(algorithm_class: type) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(algorithm_class).parameters
    except (TypeError, ValueError):
        # Some classes implemented in C expose no signature; treat them as taking nothing.
        return {}


def _check_required_parameters(
    spec: str,
    class_name: str,
    parameters: Mapping[str, inspect.Parameter],
    kwargs: Mapping[str, Any],
) -> None:
    missing = [
        name
        for name, p in parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and name not in kwargs
    ]
    if missing:
        raise AlgorithmLoadError(spec, f"{class_name}() needs option(s) that were not given: {', '.join(missing)}")
