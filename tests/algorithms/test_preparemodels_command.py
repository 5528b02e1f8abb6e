"""``manage.py preparemodels``, run as an operator would, against a throwaway settings module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from algorithms.management.commands.preparemodels import builtin_models_used_by_deployments
from algorithms.prepare import is_prepared

REPO_ROOT = Path(__file__).resolve().parents[2]

SETTINGS_TEMPLATE = """
from pathlib import Path
from types import SimpleNamespace

SECRET_KEY = "preparemodels-test"
INSTALLED_APPS = ["algorithms"]
DATA_DIR = Path({data_dir!r})
LLM_CONFIG = SimpleNamespace(
    server=SimpleNamespace(data_dir=DATA_DIR),
    deployments=[
        SimpleNamespace(name="echo", algorithm="algorithms.echo:Echo", device="cpu", options={{}}),
        SimpleNamespace(
            name="tiny",
            algorithm="algorithms.transformers_lm:TextGeneration",
            device="cpu",
            options={{"model_path": str(DATA_DIR / "models" / {model_name!r})}},
        ),
    ],
)
"""


def run_command(tmp_path: Path, *args: str, model_name: str = "tiny-gpt2") -> subprocess.CompletedProcess:
    settings_file = tmp_path / "throwaway_settings.py"
    settings_file.write_text(SETTINGS_TEMPLATE.format(data_dir=str(tmp_path / "data"), model_name=model_name))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "throwaway_settings",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)]),
        "HF_HUB_OFFLINE": "1",
    }
    argv = [sys.executable, "-m", "django", "preparemodels", *args]
    return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_prepares_the_missing_builtin_models_that_deployments_use(tmp_path):
    first = run_command(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "tiny-gpt2: ready" in first.stdout
    assert is_prepared(tmp_path / "data" / "models" / "tiny-gpt2")
    assert not (tmp_path / "data" / "models" / "smollm2-135m-instruct").exists()

    second = run_command(tmp_path)
    assert second.returncode == 0, second.stderr
    assert "tiny-gpt2: already prepared" in second.stdout


def test_deployment_of_an_operator_model_prepares_nothing(tmp_path):
    result = run_command(tmp_path, model_name="my-own-model")
    assert result.returncode == 0, result.stderr
    assert "nothing to prepare" in result.stdout


def test_unknown_name_fails_with_the_known_names(tmp_path):
    result = run_command(tmp_path, "gpt-5")
    assert result.returncode != 0
    assert "unknown built-in model(s): gpt-5" in result.stderr
    assert "tiny-gpt2" in result.stderr


def test_names_and_all_together_are_refused(tmp_path):
    result = run_command(tmp_path, "--all", "tiny-gpt2")
    assert result.returncode != 0
    assert "not both" in result.stderr


def test_only_model_paths_under_the_models_dir_count_as_builtin(tmp_path):
    models_dir = tmp_path / "models"

    def deployment(model_path: str | None) -> SimpleNamespace:
        options = {} if model_path is None else {"model_path": model_path}
        return SimpleNamespace(name="d", algorithm="x:Y", device="cpu", options=options)

    deployments = [
        deployment(str(models_dir / "smollm2-135m-instruct")),
        deployment(str(tmp_path / "elsewhere" / "tiny-gpt2")),
        deployment(str(models_dir / "someone-elses-model")),
        deployment(None),
        deployment(str(models_dir / "smollm2-135m-instruct")),
    ]
    assert builtin_models_used_by_deployments(deployments, models_dir) == ["smollm2-135m-instruct"]
