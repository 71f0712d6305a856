"""A request's path through the front end, shared by every route (OpenAI, native /generate): text to token
ids (large text off the event loop), token ids to scheduler requests (n per prompt, checked against the
context and the KV cache), and the scheduler's outputs back, merged over all of a request's generations."""

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gridserve.entrypoints.http_errors import OpenAIError, abort_error, bad_request
from gridserve.entrypoints.responses import SSEResponse, sse_stream
from gridserve.errors import InvalidParamError
from gridserve.messages import TokenizedGenerateReq
from gridserve.sampling.sampling_params import SamplingParams, json_integers

# Text beyond this many characters is tokenized on a worker thread: a multi-megabyte prompt takes seconds, and the
# event loop (every other request, /health) must not wait for it. Shorter text is faster inline than a thread hop.
OFF_LOOP_CHARS = 20_000
_TOKENIZE_POOL = ThreadPoolExecutor(1, thread_name_prefix="gridserve-tokenize")
# A token stands for at most as many characters as its vocabulary entry has (byte-level BPE: one per byte), times
# this margin for normalizers that merge characters (NFC makes "e" + U+0301 one "é"). A longer text cannot fit the
# context, so it is refused without tokenizing it (32 MB would take the tokenizing thread many seconds).
_CHARS_PER_TOKEN_MARGIN = 4
_LONGEST_TOKEN: dict[int, int | None] = {}  # by id(tokenizer)


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


def streamed(tm, reqs: list[TokenizedGenerateReq], events: AsyncIterator[dict]) -> SSEResponse:
    """A streaming route's response: `events` (built on generate_all over reqs) as server-sent events. The requests
    are submitted and sent now, so the scheduler has them while the response starts (its headers out, its body
    scheduled: 0.35-0.4 ms sooner on a 2-core CPU); any that nobody reads, because the client left before the
    stream began, are aborted when the response closes."""

    def release_all() -> None:  # release() passes over a request already released, or never submitted
        for r in reqs:
            tm.release(r)

    try:
        for r in reqs:
            tm.submit(r)
    except BaseException:
        release_all()
        raise
    tm.flush()
    return SSEResponse(sse_stream(events), on_close=release_all)


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
                     max_tokens_param: str = "max_tokens", routed_dp_rank: int | None = None,
                     priority: int | None = None) -> list[TokenizedGenerateReq]:
    """Scheduler requests for every prompt (n per prompt, in order). max_tokens=None gives each request the
    room left after its prompt, which by construction passes the context and KV-cache checks."""
    room, reqs = token_room(tm.info), []
    for ids in prompts:
        if len(ids) >= room:
            raise OpenAIError(400, f"{prompt_param}: the prompt has {len(ids)} tokens, more than the "
                              f"{room - 1} this server accepts", param=prompt_param)
        p = dataclasses.replace(params, max_new_tokens=room - len(ids) if max_tokens is None else max_tokens)
        try:
            reqs += tm.make_requests(ids, p, return_logprob, top_logprobs_num, routed_dp_rank, priority=priority)
        except InvalidParamError as e:
            raise bad_request(e, {"max_new_tokens": max_tokens_param}) from e
    return reqs


async def off_loop_if_large(chars: int, fn: Callable[[], Any]) -> Any:
    """fn() inline, or on the tokenizing thread when it handles more than OFF_LOOP_CHARS characters of text."""
    if chars <= OFF_LOOP_CHARS:
        return fn()
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZE_POOL, fn)


def text_size(items: list) -> int:
    """Characters of text in prompts (token-id prompts count 0: they need no tokenizing)."""
    return sum(len(x) for x in items if isinstance(x, str))


def max_prompt_chars(tm) -> int | None:
    """Characters beyond which a text cannot be a prompt of this server (None: the tokenizer has no vocabulary)."""
    key = id(tm.tokenizer)
    if key not in _LONGEST_TOKEN:
        try:
            _LONGEST_TOKEN[key] = max(len(piece) for piece in tm.tokenizer.get_vocab())
        except Exception:  # noqa: BLE001 - an unusual tokenizer: every text gets tokenized
            _LONGEST_TOKEN[key] = None
    longest = _LONGEST_TOKEN[key]
    return None if longest is None else (token_room(tm.info) - 1) * longest * _CHARS_PER_TOKEN_MARGIN


def check_prompt_size(tm, prompt: str | None = None, input_ids: list[int] | None = None) -> None:
    """Refuses (InvalidParamError) a prompt that cannot fit, text or ids, before the tokenizer or the id checks
    spend time on it: any front end calls this first."""
    room = token_room(tm.info)
    limit = max_prompt_chars(tm) if prompt is not None else None
    if limit is not None and len(prompt) > limit:
        raise InvalidParamError("prompt", f"the prompt has {len(prompt)} characters, more than fit in the "
                                f"{room - 1} tokens this server accepts")
    if input_ids is not None and len(input_ids) >= room:
        raise InvalidParamError("prompt", f"the prompt has {len(input_ids)} tokens, more than the {room - 1} this "
                                f"server accepts")


def tokenize(tm, prompt: str | None = None, input_ids: list[int] | None = None, param: str = "prompt") -> list[int]:
    """The prompt's token ids (check_prompt_size first); errors are 400s naming `param`."""
    try:
        check_prompt_size(tm, prompt, input_ids)
        return tm.tokenize(prompt, input_ids)
    except InvalidParamError as e:
        raise bad_request(e, {"prompt": param, "input_ids": param}) from e


def sampling_params(d: dict, renames: dict[str, str] | None = None) -> SamplingParams:
    """SamplingParams from a request body's fields (JSON: 2.0 is an integer)."""
    try:
        return SamplingParams.from_dict(json_integers(d))
    except InvalidParamError as e:
        raise bad_request(e, renames) from e


def check_finished(tm, out: dict) -> None:
    """Raises the error of an aborted request."""
    meta = out["meta_info"]
    reason = meta["finish_reason"]
    if reason is not None and reason["type"] == "abort":
        raise abort_error(reason, meta["completion_tokens"], tm.dead_reason)
