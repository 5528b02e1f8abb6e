"""`/v1/*`: the OpenAI-compatible surface. Views only route: who calls is
`request.auth` (apikeys.authentication), which backend serves the model is
`route_model`, decided once, what the body says is `gateway.protocol` (parsed for that
route), a job's life is `llmjobs.lifecycle` and what happens to it `llmjobs.follow`;
SSE formatting is `gateway.streaming`, forwarding to a provider `gateway.proxy`, a
route's backends in turn `gateway.fallbacks`."""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.http import HttpResponse, JsonResponse

from apikeys.authentication import key_errors_first
from apikeys.views import CallView, KeyView
from djangollmapi.errors import ApiError
from djangollmapi.middleware import log_fields, note_job
from djangollmapi.routes import FallbackRoute, LocalRoute, Route, UpstreamRoute, route_model, unknown_model
from gateway import cache, fallbacks, openapi, proxy
from gateway.protocol import forwarded, requests, responses
from gateway.streaming import client_gone_probe, generation_stream, sse_response
from llmjobs import lifecycle, sending, upstreamjobs
from llmjobs.follow import wait_for_output
from llmjobs.models import Job

STARTED_AT = int(time.time())  # the `created` of every local model card


def json_response(body: dict[str, Any], job: Job | None = None) -> JsonResponse:
    response = JsonResponse(body)
    if job is not None:
        response["X-Request-Id"] = str(job.id)
    return response


def max_input_chars() -> int:
    return settings.LLM_CONFIG.server.max_input_chars


def routed_call(request, kind: Job.Kind) -> tuple[Route, Any]:
    """The route of the body's model and the body read for it; a bad key is reported
    before a bad body or an unknown model."""
    with key_errors_first(request.auth):
        route = route_model(requests.model_name(request.data))
        if isinstance(route, FallbackRoute):
            return route, fallbacks.parse_routed(kind, request.data, route, max_input_chars())
        if isinstance(route, UpstreamRoute):
            return route, forwarded.parse_upstream(kind, request.data, route.upstream.reserve_tokens, max_input_chars())
        return route, requests.parse_local(kind, request.data, route, max_input_chars())


def submit(request, route: LocalRoute, call: Any) -> Job:
    job = sending.submit(request.auth.presented, route, call)
    note_job(request, job)
    return job


def model_response(request, kind: Job.Kind) -> HttpResponse:
    """A chat, completion or embeddings call: from the response cache, the provider,
    or the local model (streamed when asked)."""
    route, call = routed_call(request, kind)
    slot = cache.slot_for(route, kind, call, request.auth.presented.prefix)
    if slot is not None and (hit := cache.lookup(slot)) is not None:
        return cached_answer(request, route, call, slot, hit)
    if isinstance(route, UpstreamRoute):
        return marked(proxy.forward(request, route, call, slot), slot, "miss")
    if isinstance(route, FallbackRoute):
        served = fallbacks.serve(request, route, call)
        if not isinstance(served, fallbacks.LocalTaken):
            return served  # a provider's answer
        route, call, job = served.route, served.call, served.job  # a local backend took the job
    else:
        job = submit(request, route, call)
    if call.stream:
        stream = generation_stream(job, call, route.timeout_s, client_gone_probe(request), log_fields(request))
        return sse_response(stream, job)
    result = wait_for_output(job, route.timeout_s)
    if slot is not None:
        cache.store(slot, {"result": result})
    log_fields(request).update(
        {name: result[name] for name in ("prompt_tokens", "completion_tokens") if name in result}
    )
    return marked(json_response(local_body(route, call, job, result), job), slot, "miss")


def local_body(route: LocalRoute, call: Any, job: Job, result: dict[str, Any]) -> dict[str, Any]:
    """A local model's answer in OpenAI's shape, as this call asked for it."""
    if call.kind == Job.Kind.EMBEDDINGS:
        return responses.embedding_list(job.model, result["data"], call.encoding_format, result["prompt_tokens"])
    created = int(job.created_at.timestamp())
    return responses.completion(call.kind, responses.response_id(call.kind, job.id), created, job.model, result)


def cached_answer(request, route: Route, call: Any, slot: cache.Slot, hit: dict[str, Any]) -> HttpResponse:
    """A cache hit: recorded as a call of its own (backend `cache`), answered with a
    fresh id; neither the worker nor the provider sees it."""
    if "result" in hit:
        text, usage = hit["result"].get("text", ""), cache.usage_of(hit["result"])
    else:
        text, usage = proxy.answer_text(hit["body"]), tuple(hit.get("usage") or (0, 0))
    presented = request.auth.presented
    job = lifecycle.record_cached(presented, route.name, call, text, usage, slot.hits_count, upstreamjobs.runner())
    note_job(request, job)
    if "result" in hit:
        body = local_body(route, call, job, hit["result"])
    else:
        body = {**hit["body"], "model": route.name}
        if "id" in body:
            body["id"] = responses.response_id(call.kind, job.id)
    return marked(json_response(body, job), slot, "hit")


def marked(response: HttpResponse, slot: cache.Slot | None, outcome: str) -> HttpResponse:
    """`x-cache: hit` / `miss` on the answers of calls the cache may serve."""
    if slot is not None:
        response["x-cache"] = outcome
    return response


class ChatCompletionsView(CallView):
    """`POST /v1/chat/completions`, streamed (`stream: true`) or not."""

    @openapi.chat_completions
    def post(self, request) -> HttpResponse:
        return model_response(request, Job.Kind.CHAT)


class CompletionsView(CallView):
    """`POST /v1/completions`: a raw prompt, no chat template."""

    @openapi.completions
    def post(self, request) -> HttpResponse:
        return model_response(request, Job.Kind.COMPLETION)


class EmbeddingsView(CallView):
    """`POST /v1/embeddings` on a deployment whose algorithm has `embed`."""

    @openapi.embeddings
    def post(self, request) -> HttpResponse:
        return model_response(request, Job.Kind.EMBEDDINGS)


class TokenizeView(CallView):
    """`POST /v1/tokenize` → token ids and count. The model's own tokenizer, in its worker."""

    count_only = False

    @openapi.tokenize
    def post(self, request) -> JsonResponse:
        return self.tokenize(request)

    def tokenize(self, request) -> JsonResponse:
        with key_errors_first(request.auth):
            route = local_route(route_model(requests.model_name(request.data)))
            call = requests.parse_tokenize(request.data, max_input_chars())
        job = submit(request, route, call)
        result = wait_for_output(job, route.timeout_s)
        body = {"model": route.name, "count": result["count"]}
        if not self.count_only:
            body["tokens"] = result["tokens"]
        return json_response(body, job)


class TokenCountView(TokenizeView):
    """`POST /v1/tokenize/count` (and seed 001's `/extras/tokenize/count`) → the count only."""

    count_only = True

    @openapi.count_tokens
    def post(self, request) -> JsonResponse:
        return self.tokenize(request)


def local_route(route: Route) -> LocalRoute:
    """For what only local models offer (tokenize); a route's first local backend."""
    if isinstance(route, FallbackRoute) and route.local_backends():
        return route.local_backends()[0]
    if not isinstance(route, LocalRoute):
        message = f"The model {route.name!r} is served upstream; this needs a local model."
        raise ApiError(400, "unsupported_operation", message, param="model")
    return route


class ModelsView(KeyView):
    """`GET /v1/models`: local deployments and upstream models this key may use."""

    @openapi.list_models
    def get(self, request) -> JsonResponse:
        api_key = request.auth.key()
        cards = [
            responses.model_card(name, STARTED_AT, route_model(name).owner)
            for name in settings.LLM_CONFIG.model_names
            if api_key.may_use(name)
        ]
        return JsonResponse({"object": "list", "data": cards})


class ModelDetailView(KeyView):
    """`GET /v1/models/{id}`; a model the key may not use reads as unknown."""

    @openapi.retrieve_model
    def get(self, request, model_id: str) -> JsonResponse:
        api_key = request.auth.key()
        route = route_model(model_id)
        if not api_key.may_use(model_id):
            raise unknown_model(model_id)
        return JsonResponse(responses.model_card(model_id, STARTED_AT, route.owner))
