"""One routing decision per request: a model name is a local deployment, an upstream
provider's model, or a 404."""

from __future__ import annotations

from pathlib import Path

import pytest

from djangollmapi.config import parse_config
from djangollmapi.errors import ApiError
from djangollmapi.routes import LocalRoute, UpstreamRoute, route_local_model, route_model

CONFIG = parse_config(
    {
        "server": {"job_timeout_s": 30},
        "deployments": [
            {"name": "local", "algorithm": "algorithms.echo:Echo", "options": {"max_new_tokens": 12}},
            {"name": "quick", "algorithm": "algorithms.echo:Echo", "timeout_s": 2},
        ],
        "upstreams": [{"name": "prov", "base_url": "https://p.example/v1", "models": {"far": "their-far"}}],
    },
    "<test>",
    base_dir=Path("/tmp"),
)


def test_a_deployment_is_a_local_route_with_its_limits():
    route = route_model("local", CONFIG)
    assert isinstance(route, LocalRoute)
    assert (route.name, route.owner, route.max_tokens, route.timeout_s) == ("local", "djangollmapi", 12, 30)
    assert route_model("quick", CONFIG).timeout_s == 2
    assert route_model("quick", CONFIG).max_tokens == 64  # TextGeneration's default cap


def test_an_empty_name_is_the_default_model():
    assert route_model("", CONFIG).name == "local"  # the first deployment, with no default_model set


def test_a_providers_model_is_an_upstream_route():
    route = route_model("far", CONFIG)
    assert isinstance(route, UpstreamRoute)
    assert (route.name, route.provider, route.owner, route.model.upstream_name) == ("far", "prov", "prov", "their-far")


@pytest.mark.parametrize("name", ["nope", "their-far", "http://127.0.0.1:1/v1"])
def test_anything_else_is_a_404(name):
    with pytest.raises(ApiError) as caught:
        route_model(name, CONFIG)
    assert (caught.value.status, caught.value.code, caught.value.param) == (404, "model_not_found", "model")


def test_the_seed_api_reads_upstream_names_as_unknown():
    assert route_local_model("local", CONFIG).name == "local"
    with pytest.raises(ApiError) as caught:
        route_local_model("far", CONFIG)
    assert caught.value.code == "model_not_found"
