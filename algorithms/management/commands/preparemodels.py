"""``manage.py preparemodels [--all] [NAME ...]``: build the built-in models workers load.

Run once after install (and again after adding a deployment of a built-in model): it
converts or builds each missing model into ``<data_dir>/models/<name>`` so that no
worker pays the conversion at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from algorithms.prepare import PREPARERS, ModelPreparationError, is_prepared, prepare_model


class Command(BaseCommand):
    help = (
        "Prepare built-in models under <data_dir>/models. Without arguments, prepares the "
        "missing ones that a configured deployment uses. Built-in models: " + ", ".join(sorted(PREPARERS))
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("names", nargs="*", metavar="NAME", help="built-in model to prepare")
        parser.add_argument("--all", action="store_true", dest="prepare_all", help="prepare every built-in model")

    def handle(self, *args: Any, names: list[str], prepare_all: bool, **options: Any) -> None:
        models_dir = Path(settings.LLM_CONFIG.server.data_dir) / "models"
        for name in self._names_to_prepare(names, prepare_all, models_dir):
            self._prepare(name, models_dir)

    def _names_to_prepare(self, names: list[str], prepare_all: bool, models_dir: Path) -> list[str]:
        if names and prepare_all:
            raise CommandError("give model names or --all, not both")
        if prepare_all:
            return sorted(PREPARERS)
        if names:
            _check_known(names)
            return list(dict.fromkeys(names))
        return self._missing_models_used_by_deployments(models_dir)

    def _missing_models_used_by_deployments(self, models_dir: Path) -> list[str]:
        used = builtin_models_used_by_deployments(settings.LLM_CONFIG.deployments, models_dir)
        if not used:
            self.stdout.write("No deployment uses a built-in model; nothing to prepare.")
            return []
        missing = [name for name in used if not is_prepared(models_dir / name)]
        for name in used:
            if name not in missing:
                self.stdout.write(f"{name}: already prepared in {models_dir / name}")
        return missing

    def _prepare(self, name: str, models_dir: Path) -> None:
        dest = models_dir / name
        if is_prepared(dest):
            self.stdout.write(f"{name}: already prepared in {dest}")
            return
        try:
            prepare_model(name, models_dir, progress=self.stdout.write)
        except ModelPreparationError as exc:
            raise CommandError(f"{name}: {exc}") from exc
        except Exception as exc:  # any failure must end as one clear line, not a traceback
            raise CommandError(f"{name}: preparation failed: {type(exc).__name__}: {exc}") from exc
        self.stdout.write(self.style.SUCCESS(f"{name}: ready in {dest}"))


def builtin_models_used_by_deployments(deployments: list[Any], models_dir: Path) -> list[str]:
    """Names of built-in models that deployments load from ``models_dir``, in config order.

    A deployment uses one when its ``model_path`` option is ``<models_dir>/<name>`` for a
    built-in ``name``; a model_path anywhere else is the operator's own model.
    """
    used: dict[str, None] = {}
    for deployment in deployments:
        model_path = (deployment.options or {}).get("model_path")
        if not model_path:
            continue
        path = Path(model_path)
        if path.name in PREPARERS and _same_path(path.parent, models_dir):
            used[path.name] = None
    return list(used)


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _check_known(names: list[str]) -> None:
    unknown = [name for name in names if name not in PREPARERS]
    if unknown:
        raise CommandError(f"unknown built-in model(s): {', '.join(unknown)}; known: {', '.join(sorted(PREPARERS))}")
