"""Django settings, derived from the TOML config (djangollmapi.config) in force.

Nothing here is edited per deployment: operators change the TOML file or the
environment (`DJANGO_SECRET_KEY`, `DATABASE_URL`, `REDIS_URL`).
"""

import os
import secrets
from pathlib import Path

import dj_database_url
from corsheaders.defaults import default_headers as cors_default_headers

from djangollmapi.config import ConfigError, load_config

# Models load from local folders only; there is no hub to ask.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE_DIR = Path(__file__).resolve().parent.parent
LLM_CONFIG = load_config()
DATA_DIR = LLM_CONFIG.server.data_dir
try:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
except OSError as exc:
    raise ConfigError(LLM_CONFIG.source, "server.data_dir", f"cannot create {DATA_DIR} ({exc.strerror})") from exc

# Prometheus metrics of every process of this instance (gunicorn's workers, each device
# worker) are files here, summed when scraped (djangollmapi.metrics); set before
# prometheus_client is first imported, and inherited by every child.
METRICS_DIR = Path(os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(DATA_DIR / "metrics")))
METRICS_DIR.mkdir(exist_ok=True)


def read_or_create_secret_key(data_dir: Path) -> str:
    """A stable secret for the embedded profile, so sessions survive restarts."""
    path = data_dir / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = LLM_CONFIG.server.secret_key or read_or_create_secret_key(DATA_DIR)
DEBUG = LLM_CONFIG.server.debug
ALLOWED_HOSTS = list(LLM_CONFIG.server.allowed_hosts)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "corsheaders",
    "djangollmapi",
    "apikeys",
    "llmjobs",
    "gateway",
    "algorithms",
]

MIDDLEWARE = [
    "djangollmapi.middleware.RequestLogMiddleware",
    # Above everything that answers, so every API response, our JSON errors and
    # preflights included, carries the CORS headers (and the request log sees them).
    "corsheaders.middleware.CorsMiddleware",
    "djangollmapi.middleware.JsonErrorsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "djangollmapi.urls"
WSGI_APPLICATION = "djangollmapi.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def database_settings(url: str, data_dir: Path, pool_max_size: int) -> dict:
    """PostgreSQL through psycopg's pool (a connect costs 9-16 ms here, so never one
    per request); SQLite in the data dir when no URL is configured."""
    if not url:
        db = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(data_dir / "db.sqlite3")}
        db["TEST"] = {"NAME": str(data_dir / "test-db.sqlite3")}
    else:
        db = dj_database_url.parse(url)
    if db["ENGINE"] == "django.db.backends.sqlite3":
        # WAL + synchronous=NORMAL: a commit no longer waits for a disk sync (measured
        # 0.9 ms → 0.01 ms here), and readers never block the one writer.
        db["OPTIONS"] = {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
        db["CONN_MAX_AGE"] = None
        db["CONN_HEALTH_CHECKS"] = True
        # Django's backend with writers queued in the kernel, not in SQLite's busy
        # handler's sleeps (djangollmapi.sqlite.base).
        db["ENGINE"] = "djangollmapi.sqlite"
    if db["ENGINE"] == "django.db.backends.postgresql":
        # Django's backend, lending only live pooled connections: after the database
        # restarts, a request never gets a dead one (djangollmapi.postgresql.base).
        db["ENGINE"] = "djangollmapi.postgresql"
        db["CONN_MAX_AGE"] = 0
        # timeout: with the database down a request waits this long for a connection,
        # then gets 503 database_unavailable. reconnect_timeout: the pool's reconnection
        # attempts back off (1, 2, 4 ... s) and give up after this, so a new one starts
        # at the next request: once the database is back, the next calls find it.
        # max_idle: a connection unused this long is closed (psycopg's default keeps one
        # 10 min), so a burst's connections go back to PostgreSQL soon after it: every web
        # process, device worker and supervisor has a pool, and max_connections is 100.
        db.setdefault("OPTIONS", {})["pool"] = {
            "min_size": 1,
            "max_size": pool_max_size,
            "timeout": 2,
            "reconnect_timeout": 5,
            "max_idle": 20,
        }
        db["OPTIONS"].setdefault("connect_timeout", 3)
    return db


DATABASES = {"default": database_settings(LLM_CONFIG.database_url, DATA_DIR, LLM_CONFIG.database.pool_max_size)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
# The admin's CSS without a collectstatic step: serve from the apps' static folders.
WHITENOISE_USE_FINDERS = True

# The body limit is ours to enforce with a 413; Django's own check raises the error.
DATA_UPLOAD_MAX_MEMORY_SIZE = LLM_CONFIG.server.max_body_bytes

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["apikeys.authentication.BearerAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": [],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["djangollmapi.parsers.StrictJSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "djangollmapi.negotiation.AnswerWhateverIsAccepted",
    "EXCEPTION_HANDLER": "djangollmapi.errors.drf_exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "djangollmapi.openapi.ApiSchema",
}

# The OpenAPI schema at /api/schema/ and Swagger UI at /api/docs/ (djangollmapi.apidocs),
# described by djangollmapi.openapi and each app's openapi module.
SPECTACULAR_SETTINGS = {
    "TITLE": "djangollmapi",
    "DESCRIPTION": (
        "A self-hosted LLM API: the seed-compatible `/api/` endpoints and the OpenAI-compatible `/v1` surface. "
        'Every call sends `Authorization: Bearer <key>`; every error is `{"error": {message, type, code, param}}`.'
    ),
    "VERSION": "1",
    # 3.1: the body schemas come from pydantic, whose JSON Schema says `null` as a type.
    "OAS_VERSION": "3.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Public and keyless: the default (bearer) authentication would refuse a browser.
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # No CDN: Swagger UI's files are static files of this server (drf-spectacular-sidecar).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # validatorUrl: Swagger UI would otherwise send the schema to validator.swagger.io.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "PREPROCESSING_HOOKS": ["djangollmapi.openapi.public_api_only"],
    # Instead of the default enum hook (made for DRF serializers; the bodies are pydantic's).
    "POSTPROCESSING_HOOKS": ["gateway.openapi.with_stream_events"],
}

# CORS for browser clients ([cors]): API paths only, never the admin. No origins
# configured: no Access-Control-Allow-Origin on any response, so browsers refuse.
CORS_ALLOWED_ORIGINS = list(LLM_CONFIG.cors.allowed_origins)
CORS_ALLOW_CREDENTIALS = LLM_CONFIG.cors.allow_credentials
CORS_PREFLIGHT_MAX_AGE = LLM_CONFIG.cors.max_age_s
CORS_URLS_REGEX = r"^/(v1|api|analyze|extras)/"
# What the official OpenAI JS SDK sends from a browser (dangerouslyAllowBrowser).
OPENAI_SDK_HEADERS = (
    "openai-beta",
    "openai-organization",
    "openai-project",
    "x-stainless-arch",
    "x-stainless-helper-method",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
)
CORS_ALLOW_HEADERS = (*cors_default_headers, *OPENAI_SDK_HEADERS)
CORS_EXPOSE_HEADERS = (
    "x-request-id",
    "x-upstream-request-id",
    "retry-after",
    "retry-after-ms",
    *(f"x-ratelimit-{part}-{kind}" for part in ("limit", "remaining", "reset") for kind in ("requests", "tokens")),
)

# Celery: no result backend; each job's Redis stream carries its result (DESIGN.md).
CELERY_BROKER_URL = LLM_CONFIG.broker_url
# Celery's Django fixup closes the database (and tears down the pool) around every
# task unless this is set: that cost the worker more than the job itself. The worker
# checks its connection at the start of each job instead (llmjobs.runtime).
CELERY_DB_REUSE_MAX = 1000
REDIS_URL = LLM_CONFIG.redis_client_url
# Every client of Redis (events, rate limits, Celery's publishing) connects and waits
# for an answer this long at most: a Redis that is down or frozen is a 503 within a
# second, never a hang. Reads that block on a job's stream wait longer (llmjobs.events).
REDIS_SOCKET_TIMEOUT_S = 0.5

SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
# Behind TLS ([server] https = true). gunicorn already marks requests from nginx as
# https (forwarded_allow_ips), so no SECURE_PROXY_SSL_HEADER that anyone could forge.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = SECURE_SSL_REDIRECT = LLM_CONFIG.server.https
SECURE_HSTS_SECONDS = LLM_CONFIG.server.hsts_seconds
SECURE_HSTS_INCLUDE_SUBDOMAINS = LLM_CONFIG.server.hsts_include_subdomains
SECURE_HSTS_PRELOAD = LLM_CONFIG.server.hsts_preload

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "INFO"},
    "loggers": {
        "django.request": {"level": "ERROR"},
        # One JSON line per API call (djangollmapi.middleware.RequestLogMiddleware).
        "djangollmapi.requests": {"level": "INFO"},
        # urllib3 logs each request's path and host (a warning names the host): an
        # upstream's base_url may carry a tenant or a token, and the request log
        # already has one line per call.
        "urllib3": {"level": "ERROR"},
        # Two INFO lines per job ("received", "succeeded") cost the worker real time.
        "celery.app.trace": {"level": "WARNING"},
        "celery.worker.strategy": {"level": "WARNING"},
    },
}
