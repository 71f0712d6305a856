"""The gRPC front end (`gridserve serve --grpc-mode`): the `gridserve.Generation` service of gridserve.proto,
served by grpc.aio over the TokenizerManager of the main process.

    await serve_grpc_forever(tm, server_args, host, port)   # runs until cancelled, then stops gracefully

Status codes: a bad field (named in the message) or a request too long -> INVALID_ARGUMENT; a dead scheduler
-> UNAVAILABLE; a request aborted mid-way -> ABORTED after the responses streamed so far. A client that
cancels closes its TokenizerManager stream, which aborts the request and frees its KV cache.
"""

import contextlib
import logging
import secrets

import grpc

from gridserve.entrypoints.grpc import gridserve_pb2 as pb
from gridserve.entrypoints.grpc import gridserve_pb2_grpc as pb_grpc
from gridserve.entrypoints.request_flow import check_prompt_size, off_loop_if_large
from gridserve.errors import InvalidParamError
from gridserve.managers.tokenizer_manager import SchedulerDeadError, TokenizerManager
from gridserve.messages import TokenizedGenerateReq
from gridserve.sampling.sampling_params import SamplingParams
from gridserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

_OPTIONAL_PARAMS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "frequency_penalty", "presence_penalty", "ignore_eos", "skip_special_tokens", "seed")


def sampling_params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Unset fields keep SamplingParams' defaults; raises InvalidParamError naming a bad field."""
    d: dict = {name: getattr(msg, name) for name in _OPTIONAL_PARAMS if msg.HasField(name)}
    if msg.stop:
        d["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        d["stop_token_ids"] = list(msg.stop_token_ids)
    return SamplingParams.from_dict(d)


def _finish_reason(reason: dict) -> pb.FinishReason:
    out = pb.FinishReason(type=reason["type"])
    matched = reason.get("matched")
    if isinstance(matched, str):
        out.matched_stop = matched
    elif isinstance(matched, int):
        out.matched_token_id = matched
    return out


def _response(out: dict, start: int, text: str, finished: bool) -> pb.GenerateResponse:
    """The tokens of `out` from index `start` on, with `text`; the finish reason when `finished`."""
    meta = out["meta_info"]
    tops = meta["output_top_logprobs"][start:]
    logprobs = []
    for i, (lp, tid) in enumerate(meta["output_token_logprobs"][start:]):
        top = [pb.TopLogprob(token_id=t, logprob=v) for v, t in (tops[i] if i < len(tops) else [])]
        logprobs.append(pb.TokenLogprob(token_id=tid, logprob=lp, top_logprobs=top))
    return pb.GenerateResponse(
        id=meta["id"], token_ids=out["output_ids"][start:], text=text, prompt_tokens=meta["prompt_tokens"],
        completion_tokens=meta["completion_tokens"], cached_tokens=meta["cached_tokens"],
        finish_reason=_finish_reason(meta["finish_reason"]) if finished else None, logprobs=logprobs)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, tm: TokenizerManager):
        self.tm = tm

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            await self._generate(request, context)
        except InvalidParamError as e:  # RequestTooLargeError included
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except SchedulerDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the server is going down: {e}")
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # a bug of ours: the client gets INTERNAL, the server goes on
            logger.exception("gRPC Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {e!r}")

    async def _make_request(self, request: pb.GenerateRequest) -> TokenizedGenerateReq:
        tm = self.tm
        if tm.dead_reason:
            raise SchedulerDeadError(tm.dead_reason)
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidParamError("input", "give one of text, input_ids or messages")
        if kind == "messages":
            messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            chars = sum(len(m["content"]) for m in messages)
            input_ids = await off_loop_if_large(chars, lambda: self._tokenize(tm.apply_chat_template(messages)))
        elif kind == "text":
            input_ids = await off_loop_if_large(len(request.text), lambda: self._tokenize(request.text))
        else:
            ids = list(request.input_ids.ids)
            check_prompt_size(tm, None, ids)
            input_ids = tm.tokenize(None, ids)
        params = sampling_params_from_proto(request.sampling_params)
        [req] = tm.make_requests(input_ids, params, request.return_logprob, request.top_logprobs_num,
                                 priority=request.priority if request.HasField("priority") else None)
        return req

    def _tokenize(self, text: str) -> list[int]:
        """A text's ids (refused untokenized when it cannot fit). Callers run it on the tokenizing thread when the
        text is large, so the event loop keeps serving other RPCs meanwhile."""
        check_prompt_size(self.tm, text)
        return self.tm.tokenize(text, None)

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        req = await self._make_request(request)
        sent = 0  # tokens already written (stream mode)
        # aclosing: when the client cancels (this task is cancelled) the stream closes, which aborts the request
        async with contextlib.aclosing(self.tm.generate(req)) as outs:
            async for out in outs:
                reason = out["meta_info"]["finish_reason"]
                if reason is not None and reason["type"] == "abort":
                    code = grpc.StatusCode.UNAVAILABLE if self.tm.dead_reason else grpc.StatusCode.ABORTED
                    await context.abort(code, f"request aborted: {reason.get('message', 'aborted')}")
                if request.stream:
                    if len(out["output_ids"]) > sent or out["delta"] or reason is not None:
                        await context.write(_response(out, sent, out["delta"], reason is not None))
                        sent = len(out["output_ids"])
                elif reason is not None:
                    await context.write(_response(out, 0, out["text"], True))

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        if self.tm.dead_reason:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.tm.dead_reason)
        return pb.HealthResponse(ok=True, message="ok")

    async def ModelInfo(self, request: pb.ModelInfoRequest,
                        context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        tm, info = self.tm, self.tm.info
        eos = getattr(tm.tokenizer, "eos_token_id", None)
        return pb.ModelInfoResponse(
            served_model_name=str(tm.served_model_name), context_length=info.get("context_len", 0),
            max_total_num_tokens=info.get("max_total_num_tokens", 0),
            max_req_input_len=info.get("max_req_input_len", 0), vocab_size=tm.vocab_size,
            eos_token_ids=[eos] if isinstance(eos, int) else [])


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """--api-key for gRPC: every RPC but Health needs the metadata `authorization: Bearer <key>`, else it ends
    with UNAUTHENTICATED before the servicer runs."""

    def __init__(self, api_key: str):
        self.expected = api_key.encode()

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.endswith("/Health"):  # load balancers probe it without credentials, as /health
            return True
        value = dict(details.invocation_metadata or ()).get("authorization", "")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.expected)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or self._allowed(details):
            return handler
        message = "invalid or missing API key: send the metadata `authorization: Bearer <key>`"

        async def deny(request, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # a generator, as a streaming handler must be

        codec = dict(request_deserializer=handler.request_deserializer,
                     response_serializer=handler.response_serializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **codec)
        return grpc.unary_unary_rpc_method_handler(deny, **codec)


def create_grpc_server(tm: TokenizerManager, host: str = "0.0.0.0", port: int = 30000,
                       api_key: str | None = None) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started server and the port it bound (port 0 = any free port). Call it inside the event
    loop that will run the server; the TokenizerManager may be used from any loop. With api_key, every RPC but
    Health needs it."""
    interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
    # a taken port is an error, not a shared port
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(tm), server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"the gRPC server could not bind {address}: {e}") from e
    return server, bound


async def serve_grpc_forever(tm: TokenizerManager, server_args: ServerArgs | None = None, host: str = "0.0.0.0",
                             port: int = 30000, grace: float = 5.0) -> None:
    """Serves until cancelled (or the server is stopped); then stops, giving open streams `grace` seconds."""
    server, bound = create_grpc_server(tm, host, port, server_args.api_key if server_args is not None else None)
    await server.start()
    model = server_args.model_path if server_args is not None else None
    logger.info("gRPC server (model %s) listening on %s:%d", model or "default", host, bound)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(grace)
