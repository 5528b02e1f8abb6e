"""The hot path's two writes on PostgreSQL, each in one round trip: a call's admission
(its key's conditional UPDATE and its Job's INSERT) and its success (the job's claim,
the key's settlement and the day's rollup), each one statement of data-modifying CTEs.

One statement is atomic by itself, so neither needs BEGIN / COMMIT around it: the
admission goes from four round trips to one, the finish from four to one (each costs
~0.3-0.6 ms of latency and CPU on both ends here, and every call pays them). What
they check and write is exactly what the transactional path (`llmjobs.admission`,
`lifecycle.finish`) does, for the calls that need nothing more:

- a key without rate limits, model limits or period budgets of its own, while the
  config sets no default rate limits or budgets (`available`); its model list is
  checked in the statement. Any other key's UPDATE matches no row, changes nothing,
  and the caller takes the transactional path, which checks everything and says why
  a call is refused. A key that needed it is remembered for a while (`FULL_PATH_S`),
  so its calls do not try this path first each time.
- a job that is not budgeted (its period budgets settle in the key's lock order, on
  the transactional path).

The statements keep the transactional path's lock order (key then job at admission;
job, key, rollup at the finish: the rollup's UPSERT reads the key's UPDATE, which
makes PostgreSQL run that first), so neither can deadlock the other.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from django.conf import settings
from django.db import connection

from apikeys.keys import PresentedKey
from apikeys.models import BUDGET_PERIODS, BUDGETS, ApiKey
from apikeys.services import CONSUME_SQL, ConsumedCall, consume_params
from llmjobs import rollups, rows
from llmjobs.models import Job, UsageDay

KEYS = ApiKey._meta.db_table
JOBS = Job._meta.db_table
NO_OBJECT = "('{}'::jsonb, 'null'::jsonb)"
NO_LIST = "('[]'::jsonb, 'null'::jsonb)"
# A key's UPDATE: CONSUME_SQL's, with the conditions that say it needs nothing more.
TAKE_SQL = (
    CONSUME_SQL.split("RETURNING")[0]
    + f"""   AND rpm IS NULL AND tpm IS NULL AND max_parallel IS NULL
   AND COALESCE(model_limits, 'null'::jsonb) IN {NO_OBJECT}
   AND COALESCE(budgets, 'null'::jsonb) IN {NO_OBJECT}
   AND (COALESCE(allowed_models, 'null'::jsonb) IN {NO_LIST} OR allowed_models ? %s)
RETURNING id, weight
"""
)
JOB_COLUMNS = [column for _name, column in rows.JOB_FIELDS]
KEY_COLUMN = Job._meta.get_field("api_key").column
ADMIT_SQL = (
    f"WITH k AS ({TAKE_SQL}), j AS (INSERT INTO {JOBS} ({', '.join(JOB_COLUMNS)}) SELECT "
    + ", ".join("k.id" if column == KEY_COLUMN else "%s" for column in JOB_COLUMNS)
    + " FROM k) SELECT id, weight FROM k"
)

# How long a key that needed the transactional path goes straight to it.
FULL_PATH_S = 60.0
MAX_REMEMBERED = 10_000
full_path_until: dict[str, float] = {}


def available() -> bool:
    """Whether this database and config allow the one-statement paths at all."""
    return connection.vendor == "postgresql" and not config_limits()


def config_limits() -> bool:
    """Whether `[limits]` sets a default rate limit or period budget (every key has
    one). Read each time (a few microseconds): the config may be swapped at run time."""
    limits = settings.LLM_CONFIG.limits
    if limits.rpm or limits.tpm or limits.max_parallel:
        return True
    return any(limits.budget(period, name) is not None for period in BUDGET_PERIODS for name in BUDGETS)


def may_admit(presented: PresentedKey) -> bool:
    """Whether this key's call may try the one-statement admission."""
    return available() and full_path_until.get(presented.prefix, 0.0) <= time.monotonic()


def admit(presented: PresentedKey, model: str, job: Job) -> ConsumedCall | None:
    """Take the call and INSERT `job` (built with every column but its key) in one
    statement; the call taken, or None when the key needs the transactional path (or
    cannot be used: that path says why). `job.tokens_reserved` is what it reserves."""
    params = [*consume_params(presented, job.tokens_reserved, max(job.tokens_reserved, 1)), model]
    params += rows.params([item for item in rows.job_columns(job) if item[0] != "api_key_id"])
    with connection.cursor() as cursor:
        cursor.execute(ADMIT_SQL, params)
        row = cursor.fetchone()
    if row is None:
        return None
    job.api_key_id = row[0]
    job._state.adding, job._state.db = False, connection.alias
    return ConsumedCall(row[0], [], row[1])


def needed_full_path(presented: PresentedKey) -> None:
    """The key passed the transactional path where this one matched nothing: it has
    limits or budgets; its next calls go there first for a while."""
    if len(full_path_until) >= MAX_REMEMBERED:
        full_path_until.clear()
    full_path_until[presented.prefix] = time.monotonic() + FULL_PATH_S


# --- the finish ---------------------------------------------------------------------

ROLLUP_TABLE = UsageDay._meta.db_table
ROLLUP_KEY = UsageDay._meta.get_field("api_key").column


def finish_sql(with_rollup: bool) -> str:
    """A success's claim (rows.FINISH_SQL, for a job not budgeted), its key's settlement
    (`used - reserved`) and its day's rollup (the day of its created_at in `[limits]
    timezone`, as `rollups.usage_day` reckons it), after the transaction's
    `synchronous_commit` off (sent before it: bookkeeping, as `lifecycle.claim_finish`
    says)."""
    claim = rows.FINISH_SQL.replace(" AND status IN (%s, %s)", " AND status IN (%s, %s) AND NOT budgeted")
    sql = (
        f"WITH j AS ({claim}), "
        f"s AS (UPDATE {KEYS} SET tokens_used = tokens_used + (%s - j.tokens_reserved) FROM j "
        f"WHERE {KEYS}.id = j.api_key_id AND j.tokens_reserved <> %s RETURNING {KEYS}.id)"
    )
    if with_rollup:
        values = ", ".join("j.input_chars" if column == "input_chars" else "%s" for column in rollups.COLUMNS)
        sql += (
            f", r AS (INSERT INTO {ROLLUP_TABLE} (day, {ROLLUP_KEY}, model, {', '.join(rollups.COLUMNS)})"
            f" SELECT (j.created_at AT TIME ZONE %s)::date, j.api_key_id, j.model, {values}"
            # Reading `s` runs the key's UPDATE first: the rollup row is locked after
            # the key's, in the order of every other ending (lifecycle.fail, ...).
            f" FROM j LEFT JOIN s ON true WHERE j.api_key_id IS NOT NULL"
            f" ON CONFLICT (day, {ROLLUP_KEY}, model) DO UPDATE SET "
            + ", ".join(f"{column} = {ROLLUP_TABLE}.{column} + excluded.{column}" for column in rollups.COLUMNS)
            + ")"
        )
    return sql + " SELECT * FROM j"


@functools.cache
def zone_known(name: str) -> bool:
    """Whether PostgreSQL knows `[limits] timezone` (Python's zoneinfo checked it at
    load; a server built without that zone finishes on the transactional path)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = %s)", [name])
        return bool(cursor.fetchone()[0])


FINISH_SQL = {True: finish_sql(True), False: finish_sql(False)}


def finish(claim_params: list[Any], used: int, counts: rollups.Counts, durable: bool = False) -> tuple | None:
    """The job's success, settlement and rollup in one round trip: its ended row, or
    None when it is not active or is budgeted (the caller's transactional path then
    finds out which, and settles a budgeted job's periods). Committed without waiting
    for the disk unless `durable` (a journal's line, which is deleted once written)."""
    return finish_many([(claim_params, used, counts)], durable)[0]


def finish_many(successes: list[tuple[list[Any], int, rollups.Counts]], durable: bool = True) -> list[tuple | None]:
    """`finish` for each (claim params, used, counts), all in one round trip: one
    implicit transaction, whose locks are held for its statements only, not across
    round trips. Each one's ended row, or None (`finish`)."""
    if not successes or not zone_known(settings.LLM_CONFIG.limits.timezone):
        return [None] * len(successes)
    with_rollup = settings.LLM_CONFIG.server.usage_rollups
    params: list[Any] = []
    for claim_params, used, counts in successes:
        params += finish_params(claim_params, used, counts, with_rollup)
    statements = "; ".join([FINISH_SQL[with_rollup]] * len(successes))
    with connection.cursor() as cursor:
        if durable:
            cursor.execute(statements, params)
        else:
            cursor.execute(rows.ASYNC_COMMIT + statements, params)
            cursor.nextset()
        found = [cursor.fetchone()]
        for _ in successes[1:]:
            cursor.nextset()
            found.append(cursor.fetchone())
        return found


def finish_params(claim_params: list[Any], used: int, counts: rollups.Counts, with_rollup: bool) -> list[Any]:
    params = [*claim_params, used, used]
    if with_rollup:
        params.append(settings.LLM_CONFIG.limits.timezone)
        params += [getattr(counts, column) for column in rollups.COLUMNS if column != "input_chars"]
    return params
