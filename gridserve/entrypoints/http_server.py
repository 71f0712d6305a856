"""The HTTP front end: OpenAI-compatible routes, SGLang's native /generate, and the operator's routes
(/health, /health_generate, /server_info, /flush_cache, /metrics), around a TokenizerManager.

    app = create_app(tokenizer_manager, server_args, api_key=...)
    run_http_server(app, host, port)

The app only talks to the TokenizerManager, so it does not care how many replicas, ranks or nodes serve the
model behind it."""

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import PlainTextResponse, Response

import gridserve
from gridserve.entrypoints.body_limit import BodyLimit
from gridserve.entrypoints.http_errors import (
    ClientDisconnected,
    OpenAIError,
    as_openai_error,
    check_alive,
    check_batch_size,
    check_json_body,
)
from gridserve.entrypoints.openai.output import TokenStrings
from gridserve.entrypoints.openai.protocol import (
    REQUEST_FIELDS,
    SERVED_MAX,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResult,
    ModelCard,
    ModelList,
)
from gridserve.entrypoints.openai.serving_chat import OpenAIServingChat
from gridserve.entrypoints.openai.serving_completions import OpenAIServingCompletion
from gridserve.entrypoints.request_flow import (
    collect_finals,
    generate_all,
    off_loop_if_large,
    prepare_requests,
    sampling_params,
    streamed,
    text_size,
    token_room,
    tokenize,
)
from gridserve.entrypoints.responses import (
    ORJSONResponse,
    cancel_on_disconnect,
    error_response,
)
from gridserve.errors import InvalidParamError
from gridserve.managers.tokenizer_manager import SchedulerDeadError, ServerBusyError
from gridserve.messages import TokenizedGenerateReq
from gridserve.sampling.sampling_params import SamplingParams, short_repr
from gridserve.server_args import ServerArgs

# /health_generate: a generation that takes longer than this means the pipeline is stuck.
HEALTH_GENERATE_TIMEOUT_S = 20.0
# Routes a load balancer or Prometheus polls without credentials.
PUBLIC_ROUTES = ("/health", "/health_generate", "/metrics")


def create_app(tm, server_args: ServerArgs, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `tm`. With api_key, every route but PUBLIC_ROUTES needs `Bearer <api_key>`."""
    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="gridserve", version=gridserve.__version__, default_response_class=ORJSONResponse, **docs)
    app.state.tm, app.state.server_args = tm, server_args
    _add_error_handlers(app)
    protected = APIRouter(dependencies=[Depends(_api_key_check(api_key))] if api_key else [],
                          route_class=_JSONBodyRoute)
    _add_openai_routes(protected, tm)
    _add_native_routes(protected, tm, server_args)
    app.include_router(protected)
    app.include_router(_public_routes(tm))
    app.add_middleware(BodyLimit, max_bytes=server_args.max_request_bytes)
    app.openapi = lambda: _openapi(app)
    return app


# What the routes answer besides their 200, as ErrorResponse bodies.
_ERRORS = {
    400: "A bad request: `message` says what is wrong, `param` names the field",
    404: "`model` names a model this server does not serve",
    413: "The body is larger than --max-request-bytes",
    415: "The body is not sent as Content-Type: application/json",
    503: "The server is shutting down, or too busy to queue the request",
}


def _responses(ok: Any, description: str, *errors: int) -> dict:
    return {200: {"model": ok, "description": description},
            **{status: {"model": ErrorResponse, "description": _ERRORS[status]} for status in errors}}


# The generating routes' stream events (`stream: true`), by path.
_STREAM_EVENTS: dict[str, type[BaseModel]] = {"/v1/completions": CompletionChunk,
                                              "/v1/chat/completions": ChatCompletionChunk, "/generate": GenerateResult}


def _sse_event_schema(model: str) -> dict:
    """One server-sent event of a stream (before OpenAPI 3.2, a text/event-stream `schema` describes each event)."""
    return {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string",
        "anyOf": [{"contentMediaType": "application/json", "contentSchema": {"anyOf": [
            {"$ref": f"#/components/schemas/{model}"}, {"$ref": "#/components/schemas/ErrorResponse"}]}},
            {"const": "[DONE]"}],
        "description": f"JSON: a {model}, or an ErrorResponse when generation fails after the stream began (the "
                       "status is sent by then); the last event is `[DONE]`"}}}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, saying what the server really sends: a bad body is a 400 with an OpenAI-style error (the
    validation handler turns FastAPI's 422 into it), and `stream: true` answers text/event-stream."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        _, defs = models_json_schema([(m, "serialization") for m in (*_STREAM_EVENTS.values(), ErrorResponse)],
                                     ref_template="#/components/schemas/{model}")
        components.update(defs["$defs"])
        for path, operations in schema.get("paths", {}).items():
            for op in operations.values():
                responses = op.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {"description": _ERRORS[400], "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
                if path in _STREAM_EVENTS:
                    responses["200"]["content"]["text/event-stream"] = {
                        "schema": _sse_event_schema(_STREAM_EVENTS[path].__name__)}
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        tm = app.state.tm
        _fill_served_limits(schema, {"vocab": tm.vocab_size - 1, "context": token_room(tm.info) - 1,
                                     "dp_rank": tm.dp_size - 1})
        app.openapi_schema = schema
    return app.openapi_schema


def _fill_served_limits(node: Any, limits: dict[str, int]) -> None:
    """Turns the request models' SERVED_MAX marks into the `maximum` of this server's model."""
    if isinstance(node, dict):
        if SERVED_MAX in node:
            limit = limits[node.pop(SERVED_MAX)]
            node["maximum"] = min(limit, node.get("maximum", limit))
        for value in node.values():
            _fill_served_limits(value, limits)
    elif isinstance(node, list):
        for value in node:
            _fill_served_limits(value, limits)


def run_http_server(app: FastAPI, host: str, port: int) -> None:
    """Serves `app` until interrupted (uvicorn on uvloop, logging at the server's --log-level)."""
    level = app.state.server_args.log_level.lower()
    uvicorn.run(app, host=host, port=port, loop="uvloop",
                log_level=level if level in uvicorn.config.LOG_LEVELS else "info")


# ---- errors -----------------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    """Every failure answers `{"error": {"message", "type", "param", "code"}}` as OpenAI does."""

    async def openai_error(_: Request, exc: Exception) -> Response:
        return error_response(as_openai_error(exc))

    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(_validation_to_openai(exc))

    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = f"{request.method} {short_repr(request.url.path)}: {exc.detail}"
        # exc.headers: e.g. the Allow header of a 405
        return error_response(OpenAIError(exc.status_code, message, code=str(exc.status_code)), exc.headers)

    async def disconnected(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it: the client is gone (nginx's "client closed")

    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnected, disconnected)
    # Expected failures get their own handlers: the catch-all `Exception` one also logs a traceback.
    for expected in (OpenAIError, InvalidParamError, SchedulerDeadError, ServerBusyError, TimeoutError):
        app.add_exception_handler(expected, openai_error)
    app.add_exception_handler(Exception, openai_error)


def _validation_to_openai(exc: RequestValidationError) -> OpenAIError:
    """FastAPI's 422 becomes OpenAI's 400, naming the offending field (e.g. `messages[0].content`)."""
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "the request body is not valid JSON")
    loc = list(first.get("loc", ()))
    param = _param_path(loc[1:] if loc[:1] == ["body"] else loc)
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return OpenAIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}{more}", param=param)


def _param_path(loc: list) -> str | None:
    """`messages[0].content` from pydantic's location, stopping at union-member tags such as `list[int]`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in REQUEST_FIELDS:
            path += f".{part}" if path else part
        else:
            break
    return path or None


class _ParsedRequest(Request):
    """A request whose JSON body _JSONBodyRoute has parsed already."""

    parsed: Any

    async def json(self) -> Any:
        return self.parsed


class _JSONBodyRoute(APIRoute):
    """A route that parses its JSON body itself (check_json_body) before FastAPI sees it. FastAPI's own parsing takes
    NaN and Infinity, answers a missing or wrong content type with a "should be a valid dictionary" and invalid UTF-8
    or a nesting bomb with "There was an error parsing the body"; here each gets a 400 or 415 that says which."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def parse_first(request: Request) -> Response:
            request = _ParsedRequest(request.scope, request.receive)
            request.parsed = check_json_body(await request.body(), request.headers.get("content-type"))
            return await handler(request)

        return parse_first


def _api_key_check(api_key: str):
    expected = api_key.encode()

    async def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected):
            raise OpenAIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                              code="invalid_api_key")

    return check


# ---- routes -----------------------------------------------------------------------------------------------
def _add_openai_routes(router: APIRouter, tm) -> None:
    tokens = TokenStrings(tm.tokenizer)
    completions, chat = OpenAIServingCompletion(tm, tokens), OpenAIServingChat(tm, tokens)

    @router.post("/v1/completions", responses=_responses(
        CompletionResponse, "The completions; with `stream: true`, server-sent CompletionChunk events",
        400, 404, 413, 415, 503))
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completions.create_completion(body, request)

    @router.post("/v1/chat/completions", responses=_responses(
        ChatCompletionResponse, "The chat completion; with `stream: true`, server-sent ChatCompletionChunk events",
        400, 404, 413, 415, 503))
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat.create_chat_completion(body, request)

    def card() -> ModelCard:
        name = tm.served_model_name
        return ModelCard(id=name, root=name, max_model_len=tm.info.get("context_len"))

    @router.get("/v1/models")
    async def list_models() -> dict:
        return ModelList(data=[card()]).model_dump()

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict:
        if model_id != tm.served_model_name:
            raise OpenAIError(404, f"The model {short_repr(model_id)} does not exist", param="model",
                              code="model_not_found")
        return card().model_dump()


def _add_native_routes(router: APIRouter, tm, server_args: ServerArgs) -> None:
    @router.post("/generate", responses=_responses(
        GenerateResult | list[GenerateResult], "One result, or a list of them for a batch or n > 1; with `stream: "
        "true`, server-sent events of the cumulative GenerateResult", 400, 413, 415, 503))
    async def generate(body: GenerateRequest, request: Request) -> Response:
        check_alive(tm)
        reqs, ids, batch = await _native_requests(tm, body)
        if body.stream:
            return streamed(tm, reqs, _native_stream(tm, body, reqs, ids))
        finals = await cancel_on_disconnect(request, collect_finals(tm, reqs))
        results = [_native_result(out, ids[i], body.return_logprob) for i, out in enumerate(finals)]
        return ORJSONResponse(results if batch or len(results) > 1 else results[0])

    @router.get("/server_info")
    @router.get("/get_server_info")  # SGLang's older name
    async def server_info() -> dict:
        states = await tm.get_internal_state()
        args = dataclasses.asdict(server_args)
        if args.get("api_key"):  # whoever may read this already has the key, but it does not belong in logs
            args["api_key"] = "<hidden>"
        return {**args, **tm.info, "internal_states": states, "version": gridserve.__version__}

    @router.get("/get_model_info")
    async def model_info() -> dict:
        return {"model_path": server_args.model_path, "tokenizer_path": server_args.tokenizer_path,
                "served_model_name": tm.served_model_name, "is_generation": True}

    @router.post("/flush_cache")
    @router.get("/flush_cache")
    async def flush_cache() -> Response:
        if not await tm.flush_cache():
            raise OpenAIError(400, "cache not flushed: requests are in flight; retry when the server is idle")
        return PlainTextResponse("Cache flushed.")


def _public_routes(tm) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        check_alive(tm)
        return Response(status_code=200)

    @router.get("/health_generate")
    async def health_generate() -> Response:
        """Healthy only if one token makes it through the whole pipeline in time."""
        check_alive(tm)
        reqs = tm.make_requests(tm.tokenize("Hello", None), SamplingParams(max_new_tokens=1, temperature=0.0))
        try:
            await asyncio.wait_for(collect_finals(tm, reqs), HEALTH_GENERATE_TIMEOUT_S)
        except TimeoutError as e:
            raise OpenAIError(503, f"no token generated within {HEALTH_GENERATE_TIMEOUT_S:g} s",
                              code="service_unavailable") from e
        except OpenAIError as e:
            raise OpenAIError(503, f"generation failed: {e.message}", code="service_unavailable") from e
        return Response(status_code=200)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(tm.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


# ---- /generate --------------------------------------------------------------------------------------------
async def _native_requests(tm, body: GenerateRequest) -> tuple[list[TokenizedGenerateReq], list[str | None], bool]:
    """Scheduler requests (n per prompt, in order), the id each result reports, and whether the input was a
    batch. A client's rid only names its results: scheduler ids stay unique whatever clients send."""
    if (body.text is None) == (body.input_ids is None):
        raise OpenAIError(400, "give exactly one of text or input_ids", param="text")
    param = "text" if body.text is not None else "input_ids"
    if body.text is not None:
        batch = isinstance(body.text, list)
        items = body.text if batch else [body.text]
    else:
        batch = bool(body.input_ids) and isinstance(body.input_ids[0], list)
        items = body.input_ids if batch else [body.input_ids]
    if not items:
        raise OpenAIError(400, "the batch is empty", param=param)
    params = [sampling_params(p) for p in _per_prompt(body.sampling_params, len(items), "sampling_params")]
    check_batch_size(len(items), max(sp.n for sp in params), param)  # before any tokenizing
    rids = _per_prompt(body.rid, len(items), "rid")
    if body.text is not None:
        prompts = await off_loop_if_large(text_size(items), lambda: [tokenize(tm, t, param="text") for t in items])
    else:
        prompts = [tokenize(tm, input_ids=i, param="input_ids") for i in items]
    reqs, ids = [], []
    for prompt, sp, rid in zip(prompts, params, rids, strict=True):
        top = (body.top_logprobs_num or 0) if body.return_logprob else 0
        reqs += prepare_requests(tm, [prompt], sp, sp.max_new_tokens, return_logprob=bool(body.return_logprob),
                                 top_logprobs_num=top, prompt_param="text" if body.text is not None else "input_ids",
                                 max_tokens_param="max_new_tokens", routed_dp_rank=body.routed_dp_rank,
                                 priority=body.priority)
        ids += [rid if rid is None or sp.n == 1 else f"{rid}-{j}" for j in range(sp.n)]
    return reqs, ids, batch


def _per_prompt(value, n: int, param: str) -> list:
    """A per-prompt field given once for all prompts, or as a list of one per prompt."""
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise OpenAIError(400, f"{param}: got {len(value)} for {n} prompts", param=param)
    return value


def _native_result(out: dict, rid: str | None, return_logprob: bool | None) -> dict:
    meta = dict(out["meta_info"])
    if rid is not None:
        meta["id"] = rid
    if not return_logprob:
        meta.pop("output_token_logprobs", None)
        meta.pop("output_top_logprobs", None)
    return {"text": out["text"], "output_ids": out["output_ids"], "meta_info": meta}


async def _native_stream(tm, body: GenerateRequest, reqs: list[TokenizedGenerateReq],
                         ids: list[str | None]) -> AsyncIterator[dict]:
    """SGLang's stream: the cumulative result after each step (with `index` when there are several)."""
    async with contextlib.aclosing(generate_all(tm, reqs)) as outs:
        async for i, out in outs:
            result = _native_result(out, ids[i], body.return_logprob)
            if len(reqs) > 1:
                result["index"] = i
            yield result
