"""The loader turns a spec into an instance, and every failure names the spec and the reason."""

from __future__ import annotations

import pytest

from algorithms.base import Algorithm, SupportsCountTokens, SupportsEmbed
from algorithms.echo import Echo
from algorithms.loader import AlgorithmLoadError, build_algorithm, load_algorithm_class
from tests.algorithms import seed_shaped

SEED = "tests.algorithms.seed_shaped"


def test_module_colon_class_spec_loads_the_class():
    assert load_algorithm_class("algorithms.echo:Echo") is Echo


def test_module_spec_loads_its_algorithm_attribute():
    assert load_algorithm_class(SEED) is seed_shaped.Algorithm


def test_seed_shaped_no_argument_class_builds_unchanged_on_cpu():
    algorithm = build_algorithm(SEED)
    assert algorithm.run("hi") == "HI"
    assert isinstance(algorithm, Algorithm)


def test_cpu_with_index_counts_as_cpu_for_a_device_less_class():
    assert build_algorithm(SEED, device="cpu:1").run("a") == "A"


def test_device_and_options_are_passed_when_accepted():
    echo = build_algorithm("algorithms.echo:Echo", "cuda:0", {"prefix": "> "})
    assert echo.device == "cuda:0"
    assert echo.run("x") == "> x"
    assert isinstance(echo, SupportsCountTokens)
    assert not isinstance(echo, SupportsEmbed)


def test_var_keyword_constructor_accepts_every_option():
    algorithm = build_algorithm(f"{SEED}:TakesAnyOption", "cuda:1", {"a": 1, "b": "two"})
    assert algorithm.options == {"device": "cuda:1", "a": 1, "b": "two"}


def load_error(spec: str, device: str = "cpu", options: dict | None = None) -> str:
    with pytest.raises(AlgorithmLoadError) as caught:
        build_algorithm(spec, device, options)
    assert caught.value.spec == spec
    assert spec in str(caught.value)
    return str(caught.value)


def test_missing_module_is_named():
    assert "module 'no_such_package.models' not found" in load_error("no_such_package.models:X")


def test_missing_attribute_is_named():
    assert "has no attribute 'Missing'" in load_error("algorithms.echo:Missing")


def test_module_without_algorithm_attribute_is_named():
    assert "has no attribute 'Algorithm'" in load_error("algorithms.echo")


def test_attribute_that_is_not_a_class_is_refused():
    assert "is not a class" in load_error(f"{SEED}:not_a_class")


def test_class_without_callable_run_is_refused():
    assert "has no callable 'run'" in load_error(f"{SEED}:NotRunnable")


@pytest.mark.parametrize("spec", ["", "algorithms.echo:", "algorithms.echo:Echo:Extra", "a b:C"])
def test_malformed_spec_is_refused(spec):
    assert "expected 'package.module" in load_error(spec)


def test_option_the_constructor_does_not_take_is_named():
    message = load_error("algorithms.echo:Echo", options={"prefix": "", "temprature": 0.5})
    assert "does not accept option(s): temprature" in message


def test_gpu_device_for_a_device_less_class_is_refused():
    assert "cannot run on 'cuda:0'" in load_error(SEED, device="cuda:0")


def test_device_given_as_an_option_is_refused():
    assert "'device' is set by the deployment" in load_error("algorithms.echo:Echo", options={"device": "cpu"})


def test_required_option_that_is_missing_is_named():
    assert "needs option(s) that were not given: model_path" in load_error(f"{SEED}:NeedsModelPath")


def test_constructor_failure_is_wrapped_with_its_reason():
    assert "constructor failed: RuntimeError: weights are corrupt" in load_error(f"{SEED}:FailsToLoad")
