"""`/v1/*`: the OpenAI-compatible surface. Views only route: the wire format is in
`protocol`, streaming in `streaming`, keys in `apikeys`, jobs in `llmjobs`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from rest_framework.views import APIView

from apikeys.authentication import parse_with_key_errors_first, presented_key
from djangollmapi.errors import ApiError
from djangollmapi.middleware import log_fields
from gateway import protocol, proxy
from gateway.streaming import client_gone_probe, sse_response, stream_generation
from gateway.upstream import Route, route_for
from llmjobs import services
from llmjobs.models import Job

STARTED_AT = int(time.time())  # the `created` of every local model card
OWNER = "djangollmapi"


def json_response(body: dict[str, Any], job: Job | None = None) -> JsonResponse:
    response = JsonResponse(body)
    if job is not None:
        response["X-Request-Id"] = str(job.id)
    return response


def submit(request, parse: Callable[[Any], Any]) -> tuple[Any, Job]:
    """Key, body, call and job, in that order of reported errors; then the database
    connection goes back to the pool for the wait."""
    presented = presented_key(request)
    call = parse_with_key_errors_first(presented, parse, request.data)
    job = services.submit_job(
        presented,
        call.deployment,
        call.kind,
        call.payload(),
        input_text=call.input_text,
        reserve_tokens=call.reserve_tokens,
    )
    services.release_db_connection()
    log_fields(request).update(model=call.model, backend="local", request_id=str(job.id))
    return call, job


def upstream_route(request) -> Route | None:
    """The provider serving the body's model, if any: decided by a configured model
    name alone, never by anything else the client sends. The key's form is checked
    first, so a missing or malformed key is a 401 whatever the body."""
    presented_key(request)
    return route_for(request.data.get("model")) if isinstance(request.data, dict) else None


def generation_response(request, parse: Callable[[Any], protocol.GenerationCall], kind: str) -> HttpResponse:
    route = upstream_route(request)
    if route is not None:
        return proxy.forward(request, kind, route)
    call, job = submit(request, parse)
    timeout_s = settings.LLM_CONFIG.job_timeout_for(call.deployment)
    if call.stream:
        stream = stream_generation(job, call, timeout_s, client_gone_probe(request), log_fields(request))
        return sse_response(stream, job)
    result = services.wait_for_output(job, timeout_s)
    log_fields(request).update(prompt_tokens=result["prompt_tokens"], completion_tokens=result["completion_tokens"])
    build = protocol.chat_completion if call.kind == "chat" else protocol.text_completion
    body = build(protocol.response_id(call.kind, job.id), int(job.created_at.timestamp()), call.model, result)
    return json_response(body, job)


class ChatCompletionsView(APIView):
    """`POST /v1/chat/completions`, streamed (`stream: true`) or not."""

    authentication_classes = []

    def post(self, request) -> HttpResponse:
        return generation_response(request, protocol.parse_chat, "chat")


class CompletionsView(APIView):
    """`POST /v1/completions`: a raw prompt, no chat template."""

    authentication_classes = []

    def post(self, request) -> HttpResponse:
        return generation_response(request, protocol.parse_completion, "completion")


class EmbeddingsView(APIView):
    """`POST /v1/embeddings` on a deployment whose algorithm has `embed`."""

    authentication_classes = []

    def post(self, request) -> HttpResponse:
        route = upstream_route(request)
        if route is not None:
            return proxy.forward(request, "embeddings", route)
        call, job = submit(request, protocol.parse_embeddings)
        result = services.wait_for_output(job, settings.LLM_CONFIG.job_timeout_for(call.deployment))
        log_fields(request)["prompt_tokens"] = result["prompt_tokens"]
        body = protocol.embedding_list(call.model, result["data"], call.encoding_format, result["prompt_tokens"])
        return json_response(body, job)


class TokenizeView(APIView):
    """`POST /v1/tokenize` → token ids and count; `/v1/tokenize/count` (and seed 001's
    `/extras/tokenize/count`) → the count only. The model's own tokenizer, in its worker."""

    authentication_classes = []
    count_only = False

    def post(self, request) -> JsonResponse:
        call, job = submit(request, protocol.parse_tokenize)
        result = services.wait_for_output(job, settings.LLM_CONFIG.job_timeout_for(call.deployment))
        body = {"model": call.model, "count": result["count"]}
        if not self.count_only:
            body["tokens"] = result["tokens"]
        return json_response(body, job)


def model_owner(name: str) -> str | None:
    """Who serves a model name: us (a local deployment), a provider, or nobody."""
    config = settings.LLM_CONFIG
    if config.deployment(name):
        return OWNER
    found = config.upstream_for(name)
    return found[0].name if found else None


class ModelsView(APIView):
    """`GET /v1/models`: local deployments and upstream models this key may use."""

    def get(self, request) -> JsonResponse:
        cards = [
            protocol.model_card(name, STARTED_AT, model_owner(name))
            for name in settings.LLM_CONFIG.model_names
            if request.auth.may_use(name)
        ]
        return JsonResponse({"object": "list", "data": cards})


class ModelDetailView(APIView):
    """`GET /v1/models/{id}`; a model the key may not use reads as unknown."""

    def get(self, request, model_id: str) -> JsonResponse:
        owner = model_owner(model_id)
        if owner is None or not request.auth.may_use(model_id):
            raise ApiError(404, "model_not_found", f"The model {model_id!r} does not exist.", param="model")
        return JsonResponse(protocol.model_card(model_id, STARTED_AT, owner))
