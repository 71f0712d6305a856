"""Pieces shared by the HTTP routes: OpenAI-style errors, orjson responses, server-sent events that stop
generation when the client goes away, and turning prompts into scheduler requests."""

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from gridserve.errors import InvalidParamError
from gridserve.managers.tokenizer_manager import SchedulerDeadError, ServerBusyError
from gridserve.messages import TokenizedGenerateReq
from gridserve.sampling.sampling_params import MAX_N, SamplingParams, is_encodable, short_repr  # noqa: F401

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Most alternatives per token a client may ask for (OpenAI's own limit for chat's top_logprobs).
MAX_TOP_LOGPROBS = 20
# Most choices per prompt: each one is a scheduler request, so an unbounded n is a denial of service.
MAX_PROMPTS = 1024  # prompts x n in one HTTP request: each is a scheduler request sent from the event loop
# JSON has no -inf; a token the model rules out gets this instead (vLLM's convention).
MIN_LOGPROB = -9999.0


# ---- errors ---------------------------------------------------------------------------------------------
class OpenAIError(Exception):
    """Ends a request with `{"error": {...}}` and an HTTP status, from anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 err_type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.err_type = err_type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}}


class ClientDisconnected(Exception):
    """The client went away before its non-streaming response was ready."""


def bad_request(e: InvalidParamError, renames: dict[str, str] | None = None) -> OpenAIError:
    """A 400 naming the field as the client spelt it (e.g. SamplingParams' max_new_tokens is max_tokens)."""
    param = (renames or {}).get(e.param, e.param)
    return OpenAIError(400, f"{param}: {e.message}", param=param)


def abort_error(reason: dict, completion_tokens: int, dead_reason: str | None) -> OpenAIError:
    """An "abort" finish means the scheduler failed or refused the request: say which, with a fitting status."""
    message = reason.get("message") or "the request was aborted"
    if dead_reason:
        return OpenAIError(503, f"the server is shutting down: {dead_reason}", code="service_unavailable")
    if completion_tokens == 0:  # refused at admission: the scheduler found the request itself invalid
        return OpenAIError(400, message)
    return OpenAIError(500, f"generation failed: {message}")


def as_openai_error(e: Exception) -> OpenAIError:
    """Any failure as the error a client should see; unexpected ones are logged with their traceback."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, InvalidParamError):
        return bad_request(e)
    if isinstance(e, SchedulerDeadError):
        return OpenAIError(503, f"the server is shutting down: {e}", code="service_unavailable")
    if isinstance(e, TimeoutError):
        return OpenAIError(503, "the scheduler did not answer in time", code="service_unavailable")
    if isinstance(e, ServerBusyError):
        return OpenAIError(503, f"the server is busy: {e}", code="service_unavailable")
    logger.error("request failed", exc_info=e)
    return OpenAIError(500, f"internal error: {e!r}")


def check_alive(tm) -> None:
    if tm.dead_reason:
        raise OpenAIError(503, f"the server is shutting down: {tm.dead_reason}", code="service_unavailable")


def check_model(requested: str | None, served: str) -> None:
    """Clients often send a placeholder model name; the server has exactly one model."""
    if requested not in (None, "", "default", served):
        raise OpenAIError(404, f"The model {short_repr(requested)} does not exist; this server serves `{served}`.",
                          param="model", code="model_not_found")


def check_batch_size(prompts: int, n: int, param: str = "prompt") -> None:
    """One HTTP request may fan out into at most MAX_PROMPTS scheduler requests (prompts x n)."""
    if prompts * n > MAX_PROMPTS:
        raise OpenAIError(400, f"{param}: {prompts} prompts x n={n} = {prompts * n} generations, more than the "
                          f"{MAX_PROMPTS} one request may ask for; split it", param=param)


# ---- responses ------------------------------------------------------------------------------------------
def dumps(obj: Any) -> bytes:
    # default=str: server_args may hold paths or enums; never fail a response on them
    return orjson.dumps(obj, default=str)


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(err: OpenAIError, headers: dict[str, str] | None = None) -> ORJSONResponse:
    return ORJSONResponse(err.body(), status_code=err.status, headers=headers)


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def sse_stream(events: AsyncIterator[dict]) -> AsyncIterator[bytes]:
    """SSE framing: every event as `data: {json}`, an error event if the stream fails, then `data: [DONE]`."""
    try:
        async with contextlib.aclosing(events) as it:
            async for event in it:
                yield sse(event)
    except Exception as e:  # noqa: BLE001 - the status line is sent already: the error goes in the stream
        yield sse(as_openai_error(e).body())
    yield SSE_DONE


class SSEResponse(StreamingResponse):
    """A text/event-stream response that closes its body generator as soon as the client disconnects (even
    while it waits for the next token), so TokenizerManager.generate's cleanup aborts the requests at once
    and their KV cache is freed. Starlette alone would leave the generator to the garbage collector."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watch):
                task.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
            await self.body_iterator.aclose()
        if stream.done() and not stream.cancelled() and stream.exception() is not None:
            exc = stream.exception()
            if not isinstance(exc, OSError):  # OSError: the socket closed under us, i.e. a disconnect
                logger.error("streaming response failed", exc_info=exc)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (which aborts its scheduler requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


# ---- running requests -----------------------------------------------------------------------------------
async def merge_streams(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """Yields (index, output) from all streams as outputs arrive. Leaving early (an error, a disconnect)
    cancels every stream still running; a cancelled TokenizerManager.generate aborts its request."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, done))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait((i, e))
        finally:
            await stream.aclose()

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def generate_all(tm, reqs: list[TokenizedGenerateReq], stream: bool = True) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, cumulative output) of every request as they progress (only the finals unless stream);
    raises a failed request's error."""
    async with contextlib.aclosing(merge_streams([tm.generate(r, stream) for r in reqs])) as merged:
        async for i, out in merged:
            check_finished(tm, out)
            yield i, out


async def collect_finals(tm, reqs: list[TokenizedGenerateReq]) -> list[dict]:
    """The final output of every request, in order; raises a failed request's error."""
    finals: list[dict] = [{}] * len(reqs)
    async with contextlib.aclosing(generate_all(tm, reqs, stream=False)) as outs:
        async for i, out in outs:
            finals[i] = out
    return finals


def token_room(info: dict) -> int:
    """Most tokens (prompt + output) one request may hold: the context length and the whole KV cache."""
    return min(info["context_len"], info["max_total_num_tokens"])


def prepare_requests(tm, prompts: list[list[int]], params: SamplingParams, max_tokens: int | None, *,
                     return_logprob: bool = False, top_logprobs_num: int = 0, prompt_param: str = "prompt",
                     max_tokens_param: str = "max_tokens", routed_dp_rank: int | None = None
                     ) -> list[TokenizedGenerateReq]:
    """Scheduler requests for every prompt (n per prompt, in order). max_tokens=None gives each request the
    room left after its prompt, which by construction passes the context and KV-cache checks."""
    room, reqs = token_room(tm.info), []
    for ids in prompts:
        if len(ids) >= room:
            raise OpenAIError(400, f"{prompt_param}: the prompt has {len(ids)} tokens, more than the "
                              f"{room - 1} this server accepts", param=prompt_param)
        p = dataclasses.replace(params, max_new_tokens=room - len(ids) if max_tokens is None else max_tokens)
        try:
            reqs += tm.make_requests(ids, p, return_logprob, top_logprobs_num, routed_dp_rank)
        except InvalidParamError as e:
            raise bad_request(e, {"max_new_tokens": max_tokens_param}) from e
    return reqs


# Text beyond this many characters is tokenized on a worker thread: a multi-megabyte prompt takes seconds, and the
# event loop (every other request, /health) must not wait for it. Shorter text is faster inline than a thread hop.
OFF_LOOP_CHARS = 20_000
_TOKENIZE_POOL = ThreadPoolExecutor(1, thread_name_prefix="gridserve-tokenize")


async def off_loop_if_large(chars: int, fn: Callable[[], Any]) -> Any:
    """fn() inline, or on the tokenizing thread when it handles more than OFF_LOOP_CHARS characters of text."""
    if chars <= OFF_LOOP_CHARS:
        return fn()
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZE_POOL, fn)


def text_size(items: list) -> int:
    """Characters of text in prompts (token-id prompts count 0: they need no tokenizing)."""
    return sum(len(x) for x in items if isinstance(x, str))


def tokenize(tm, prompt: str | None = None, input_ids: list[int] | None = None, param: str = "prompt") -> list[int]:
    try:
        return tm.tokenize(prompt, input_ids)
    except InvalidParamError as e:
        raise bad_request(e, {"prompt": param, "input_ids": param}) from e


def sampling_params(d: dict, renames: dict[str, str] | None = None) -> SamplingParams:
    try:
        return SamplingParams.from_dict(d)
    except InvalidParamError as e:
        raise bad_request(e, renames) from e


def check_finished(tm, out: dict) -> None:
    """Raises the error of an aborted request."""
    meta = out["meta_info"]
    reason = meta["finish_reason"]
    if reason is not None and reason["type"] == "abort":
        raise abort_error(reason, meta["completion_tokens"], tm.dead_reason)


def finish_reason(out: dict) -> str | None:
    reason = out["meta_info"]["finish_reason"]
    return None if reason is None else ("length" if reason["type"] == "length" else "stop")


def usage(finals: list[dict], n: int) -> dict:
    """OpenAI usage over every choice: each prompt counts once (its n choices share it)."""
    prompt = cached = completion = 0
    for start in range(0, len(finals), n):
        group = [o["meta_info"] for o in finals[start:start + n]]
        prompt += group[0]["prompt_tokens"]
        cached += min(max(m["cached_tokens"] for m in group), group[0]["prompt_tokens"])
        completion += sum(m["completion_tokens"] for m in group)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ---- logprobs -------------------------------------------------------------------------------------------
def clamp_logprob(lp: float) -> float:
    return lp if math.isfinite(lp) else (MIN_LOGPROB if lp < 0 else 0.0)


class TokenStrings:
    """Text and raw bytes of single tokens, for logprobs. Bytes are exact for byte-level BPE tokenizers (a
    token may hold half a UTF-8 character, which its decoded text shows as U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = functools.lru_cache(maxsize=1 << 16)(self._bytes)
        self._byte_decoder = _byte_decoder() if self._is_byte_level() else None

    def _is_byte_level(self) -> bool:
        try:
            ids = self.tokenizer.encode(" a b", add_special_tokens=False)
            return any(t.startswith("Ġ") for t in self.tokenizer.convert_ids_to_tokens(ids))
        except Exception:  # noqa: BLE001 - an unusual tokenizer just gets UTF-8 of the decoded text
            return False

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> list[int]:
        if self._byte_decoder is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if piece is not None and all(c in self._byte_decoder for c in piece):
                return [self._byte_decoder[c] for c in piece]
        return list(self._text(token_id).encode("utf-8"))


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-printable-character table, inverted: printable bytes map to themselves, the rest to
    characters from U+0100 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def new_logprobs(out: dict, start: int) -> tuple[list[tuple[float, int]], list[list[tuple[float, int]]]]:
    """The chosen tokens' (logprob, id) and their top alternatives, from token `start` on."""
    meta = out["meta_info"]
    return meta["output_token_logprobs"][start:], meta["output_top_logprobs"][start:]
