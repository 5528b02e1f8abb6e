"""Test settings: the project's settings with the test config and data dir.

Subprocesses (gunicorn, workers) started by the fixtures import this module too, so
they see the same config, data dir and Redis as the test process."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DJANGO_LLM_API_CONFIG", str(ROOT / "tests" / "djangollmapi.test.toml"))
os.environ.setdefault("DJANGO_LLM_API_DATA_DIR", str(ROOT / ".pytest-data"))
if not os.environ.get("REDIS_URL"):
    # No Redis given: the suite starts the embedded one on this socket (conftest).
    os.environ["REDIS_URL"] = f"unix://{os.environ['DJANGO_LLM_API_DATA_DIR']}/redis.sock"
    os.environ["DLA_TEST_EMBEDDED_REDIS"] = "1"

from djangollmapi.settings import *  # noqa: E402,F403

# The slow tests share one converted SmolLM2 (tests/algorithms reads this variable).
os.environ.setdefault("DLA_TEST_MODELS_DIR", str(LLM_CONFIG.models_dir))  # noqa: F405

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
