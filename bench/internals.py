"""The app's internal names, and its database read from outside (diagnostics only).

The benchmarks wait for workers and read job rows and job streams without importing
Django (whose settings would then be this process's), so the few internal names they
need are copied here, in one place. Everything else goes through public entry points:
HTTP, `manage.py` commands, `djangollmapi.processes` and `djangollmapi.config`.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import subprocess
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from report import say

# Copies of the app's own names; keep them in step with llmjobs.routing.QUEUE_PREFIX,
# llmjobs.events.heartbeat_key / stream_key, the tables of llmjobs.Job and
# apikeys.ApiKey, apikeys.keys.format_key, and how a chat request's messages are
# stored as the job's input_text.
QUEUE_PREFIX = "dla.device."
JOB_TABLE = "llmjobs_job"
KEY_TABLE = "apikeys_apikey"
USAGE_TABLE = "llmjobs_usageday"  # the daily rollups


def device_queue(device: str) -> str:
    """The Celery queue of a device's worker."""
    return QUEUE_PREFIX + device.replace(":", "-")


def heartbeat_key(device: str) -> str:
    """The Redis hash of a device's live workers (a field each, on any host): it exists
    while any of them beats, which each starts once its models are loaded."""
    return f"dla:worker:{device_queue(device)}"


def job_stream_key(job_id: str) -> str:
    """The Redis stream of a job's events (one entry per token, XADDed by the worker)."""
    return f"dla:job:{job_id}"


def key_prefix(api_key: str) -> str:
    """The prefix column of a plaintext key (`<scheme>_<prefix>_<secret>`)."""
    return api_key.split("_", 2)[1]


def chat_input_like(tag: str) -> str:
    """A LIKE pattern for the input_text of chat jobs whose one user message starts with `tag #`."""
    return f"user: {tag} #%"


def job_key(job_id: str, database: str) -> str:
    """A job id (X-Request-Id) as its row's id column holds it: SQLite keeps UUIDs as 32 hex digits."""
    return uuid.UUID(str(job_id)).hex if database == "sqlite" else str(job_id)


# ---------------------------------------------------------------- the database


def query(database: str, url: str, data_dir: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    """Run a read-only query written with `{p}` placeholders on PostgreSQL at `url`, or
    on the SQLite file in `data_dir`. SQLite hands back datetimes as text and UUIDs as
    32 hex digits; see `as_epoch` and `job_key`."""
    if database == "postgres":
        import psycopg

        with psycopg.connect(url, connect_timeout=3) as conn:
            return conn.execute(sql.format(p="%s"), list(params)).fetchall()
    with sqlite3.connect(f"file:{data_dir / 'db.sqlite3'}?mode=ro", uri=True, timeout=20) as conn:
        return conn.execute(sql.format(p="?"), list(params)).fetchall()


def as_epoch(value: Any) -> float | None:
    """A job-row timestamp as Unix seconds: SQLite gives naive UTC text, PostgreSQL aware datetimes."""
    if value is None:
        return None
    moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def postgres_backend_pids(url: str) -> list[int]:
    """The server processes serving connections to `url`'s database (for CPU accounting)."""
    import psycopg

    dbname = urllib.parse.urlparse(url).path.lstrip("/")
    with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", [dbname]
        ).fetchall()
    return [row[0] for row in rows]


def ensure_postgres_database(url: str) -> str:
    """Create the bench database if it is missing; return the server version."""
    import psycopg

    parts = urllib.parse.urlparse(url)
    dbname = parts.path.lstrip("/")
    if not dbname:
        raise RuntimeError(f"DATABASE_URL {redact(url)} names no database")
    maintenance = parts._replace(path="/postgres").geturl()
    with psycopg.connect(maintenance, autocommit=True, connect_timeout=3) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname]).fetchone()
        version = conn.execute("SHOW server_version").fetchone()[0]
    if not exists:
        say(f"creating database {dbname}")
        argv = ["createdb"]
        if parts.hostname:
            argv += ["-h", parts.hostname]
        if parts.port:
            argv += ["-p", str(parts.port)]
        if parts.username:
            argv += ["-U", urllib.parse.unquote(parts.username)]
        env = {**os.environ}
        if parts.password:
            env["PGPASSWORD"] = urllib.parse.unquote(parts.password)
        subprocess.run([*argv, dbname], check=True, env=env, timeout=60)
    return version


def redact(url: str) -> str:
    """`url` with its password, if any, as ***."""
    parts = urllib.parse.urlparse(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url
