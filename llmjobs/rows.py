"""The Job table's raw SQL, for the statements every call runs (the row's INSERT, the
worker's claim, and the UPDATE that finishes it), and the adaptation of their parameters: the ORM's
save costs some 800 Python calls a row here, these about 150. It executes nothing;
`llmjobs.lifecycle` runs them."""

from __future__ import annotations

from typing import Any

from django.db import connection

from llmjobs.models import Job

JOB_FIELDS = [(field.attname, field.column) for field in Job._meta.concrete_fields]
INSERT_SQL = (
    f"INSERT INTO {Job._meta.db_table} ({', '.join(column for _name, column in JOB_FIELDS)})"
    f" VALUES ({', '.join(['%s'] * len(JOB_FIELDS))})"
)


def job_columns(job: Job) -> list[tuple[str, Any]]:
    """(field, value) for every column, in INSERT_SQL's order."""
    return [(name, getattr(job, name)) for name, _column in JOB_FIELDS]


FINISH_SQL = f"""
UPDATE {Job._meta.db_table}
   SET status = %s, finished_at = %s, output = %s, output_chars = %s,
       prompt_tokens = %s, completion_tokens = %s, cost_usd = %s, tokens_settled = %s,
       device_s = %s, batch_size = %s
 WHERE id = %s AND status IN (%s, %s)
RETURNING api_key_id, tokens_reserved, model, created_at, input_chars, rate_limited, budgeted, spend_reserved
"""

# Sent before a bookkeeping statement on PostgreSQL, in the same round trip: its commit
# waits for no disk flush (a crash may lose its last instants, never a charge).
ASYNC_COMMIT = "SET LOCAL synchronous_commit TO OFF; "

# The worker's claim of a queued job (`lifecycle.start`).
START_SQL = f"UPDATE {Job._meta.db_table} SET status = %s, started_at = %s, worker = %s WHERE id = %s AND status = %s"


# The columns whose Python values the database driver cannot take as they are; the
# others (text, integers, booleans, NULL) go through unchanged.
ADAPTED = {"id", "output", "created_at", "started_at", "finished_at", "cost_usd"}


def params(values: list[tuple[str, Any]]) -> list[Any]:
    """`values` as the driver takes them."""
    return [db_value(name, value) if name in ADAPTED else value for name, value in values]


def db_value(field_name: str, value: Any) -> Any:
    """A Python value as the Job column stores it (UUID, JSON, datetime, decimal)."""
    if value is None:
        return None
    field = Job._meta.get_field(field_name)  # by its attname, which is its name here
    if isinstance(value, str) and field_name == "id":
        value = field.to_python(value)
    return field.get_db_prep_save(value, connection)
