"""The seed-compatible endpoints in the OpenAPI schema: `POST /api/` (and `/analyze/`),
async jobs and usage, as decorators the views wear (`@openapi.run`). The response
models describe the bodies `llmjobs.views` builds, for the schema only."""

from __future__ import annotations

import datetime
import uuid
from typing import Any, Literal

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from pydantic import BaseModel, Field

from djangollmapi.openapi import CALL_ERRORS, ERROR_HEADERS, KEY_ERRORS, error_responses
from llmjobs.validation import RunBody

TAG = "Seed API (/api)"

NO_SUCH_MODEL = "No such local deployment (`model_not_found`); an upstream model reads as unknown here."


class RunAnswer(BaseModel):
    message: Any = Field(description="What the algorithm's `run` returned: a string, or any JSON.")
    job_id: uuid.UUID
    model: str


class JobAccepted(BaseModel):
    job_id: uuid.UUID
    status: Literal["queued"]
    model: str


class JobResult(BaseModel):
    message: Any = Field(description="As `POST /api/` answers it.")


class JobError(BaseModel):
    code: str
    message: str


class JobState(BaseModel):
    """A job of the calling key: where it stands, and how it ended."""

    job_id: uuid.UUID
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: datetime.datetime
    started_at: datetime.datetime | None
    finished_at: datetime.datetime | None
    queue_position: int = Field(None, description="While queued: how many jobs go first (0: next).")
    eta_s: float | None = Field(None, description="While queued: seconds until it should start, once measured.")
    result: JobResult = Field(None, description="Once succeeded.")
    error: JobError = Field(None, description="Once failed.")


class KeyUsage(BaseModel):
    name: str
    prefix: str = Field(description="The key's public part (`dla_<prefix>_…`); never its secret.")
    status: Literal["active", "quota used", "tokens used"]
    calls_used: int
    max_calls: int | None = Field(description="null: unlimited.")
    calls_left: int | None
    tokens_used: int
    max_tokens_total: int | None = Field(description="null: no token budget.")
    tokens_left: int | None
    valid_from: datetime.datetime | None
    valid_until: datetime.datetime | None


class DayUsage(BaseModel):
    """One day of the key's usage, from the daily rollups: calls that have ended, on the
    day (in `[limits] timezone`) they were made."""

    day: datetime.date
    requests: int = Field(description="Every ended call of the day, refunded ones included.")
    calls: int = Field(description="The calls charged (not refunded).")
    succeeded: int
    failed: int
    cancelled: int
    refunded: int
    input_chars: int
    output_chars: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float = Field(description="Spend on priced upstream models (0 when none was priced).")
    device_s: float = Field(description="Device-seconds of local jobs (0 when none ran).")


class UsageReport(BaseModel):
    key: KeyUsage
    days: list[DayUsage]


RUN_DESCRIPTION = (
    "The seed's call: `text` to a local deployment's `Algorithm.run`, waiting for its answer. `model` omitted: "
    "`[server] default_model`. A call that fails on the server side is refunded."
)

run = extend_schema(
    operation_id="run",
    summary="Run a local model on a text and wait for its answer",
    description=RUN_DESCRIPTION,
    tags=[TAG],
    request=RunBody,
    responses={
        200: RunAnswer,
        **error_responses(CALL_ERRORS, e404=NO_SUCH_MODEL),
    },
    parameters=ERROR_HEADERS,
)

create_job = extend_schema(
    operation_id="createJob",
    summary="Queue a run and poll for it",
    description="The body of `POST /api/`; answered at once, with the job to poll in `Location`.",
    tags=[TAG],
    request=RunBody,
    responses={
        202: OpenApiResponse(JobAccepted, "Queued."),
        **error_responses(CALL_ERRORS, e404=NO_SUCH_MODEL),
    },
    parameters=[
        OpenApiParameter(
            "Location",
            str,
            OpenApiParameter.HEADER,
            response=[202],
            required=True,
            description="The job's URL (`GET /api/jobs/{job_id}/`).",
        ),
        *ERROR_HEADERS,
    ],
)

retrieve_job = extend_schema(
    operation_id="retrieveJob",
    summary="A job of this key: status, queue position, result or error",
    tags=[TAG],
    responses={
        200: JobState,
        **error_responses((*KEY_ERRORS, 404), e404="No such job of this key (`job_not_found`)."),
    },
    parameters=[
        OpenApiParameter("job_id", uuid.UUID, OpenApiParameter.PATH, description="As `POST /api/jobs/` answered."),
        *ERROR_HEADERS,
    ],
)

usage = extend_schema(
    operation_id="retrieveUsage",
    summary="This key's quota, budget, window and use per day",
    tags=[TAG],
    responses={200: UsageReport, **error_responses(KEY_ERRORS)},
    parameters=ERROR_HEADERS,
)
