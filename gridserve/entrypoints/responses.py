"""How answers reach the client: orjson bodies, server-sent events, and waiting for a result in a way that
stops generation (and frees its KV cache) as soon as the client goes away."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from gridserve.entrypoints.http_errors import ClientDisconnected, OpenAIError, as_openai_error

logger = logging.getLogger(__name__)

T = TypeVar("T")


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

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None] | None = None):
        """on_close: called once the response is over, however it ended (even if its body never started)."""
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

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
            if self.on_close is not None:
                self.on_close()
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
