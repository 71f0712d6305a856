"""TokenizerManager: the front end's view of requests. Tokenizes and validates, sends TokenizedGenerateReq
to the scheduler, and turns the scheduler's token outputs back into per-request results and streams."""

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gridserve.detokenizer import IncrementalDetokenizer
from gridserve.errors import InvalidParamError, RequestTooLargeError
from gridserve.messages import AbortReq, BatchTokenIDOutput, TokenizedGenerateReq
from gridserve.sampling.sampling_params import SamplingParams


@dataclass
class ReqState:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    detok: IncrementalDetokenizer
    prompt_tokens: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    finished: bool = False
    created: float = field(default_factory=time.perf_counter)


class TokenizerManager:
    def __init__(self, tokenizer, scheduler_info: dict, vocab_size: int, send: Callable[[object], None],
                 random_seed: int = 0):
        self.tokenizer = tokenizer
        self.info = scheduler_info
        self.vocab_size = vocab_size
        self.send = send
        self.rid_to_state: dict[str, ReqState] = {}
        self.seed_rng = random.Random(random_seed)  # seeds for requests that give none

    # ---- inputs ---------------------------------------------------------------------------------
    def tokenize(self, prompt: str | None, input_ids: list[int] | None) -> list[int]:
        if (prompt is None) == (input_ids is None):
            raise InvalidParamError("prompt", "give exactly one of prompt or input_ids")
        if input_ids is None:
            if not isinstance(prompt, str):
                raise InvalidParamError("prompt", f"must be a string, got {type(prompt).__name__}")
            input_ids = self.tokenizer.encode(prompt)
        if not isinstance(input_ids, list) or not all(isinstance(t, int) for t in input_ids):
            raise InvalidParamError("input_ids", "must be a list of ints")
        if not input_ids:
            raise InvalidParamError("prompt", "the prompt is empty")
        bad = [t for t in input_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidParamError("input_ids", f"token ids must be in [0, {self.vocab_size}), got {bad[0]}")
        return input_ids

    def validate_length(self, n_prompt: int, params: SamplingParams) -> None:
        ctx, pool = self.info["context_len"], self.info["max_total_num_tokens"]
        total = n_prompt + params.max_new_tokens
        if total > ctx:
            raise RequestTooLargeError("max_new_tokens", f"prompt ({n_prompt} tokens) + max_new_tokens "
                                       f"({params.max_new_tokens}) = {total} exceeds the context length ({ctx})")
        if total > pool:
            raise RequestTooLargeError("max_new_tokens", f"prompt ({n_prompt} tokens) + max_new_tokens "
                                       f"({params.max_new_tokens}) = {total} exceeds the KV cache ({pool} tokens)")

    def make_requests(self, input_ids: list[int], params: SamplingParams, return_logprob: bool = False,
                      top_logprobs_num: int = 0) -> list[TokenizedGenerateReq]:
        """One scheduler request per choice (n); each choice gets its own seed, so they differ."""
        self.validate_length(len(input_ids), params)
        if not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
            raise InvalidParamError("top_logprobs_num", f"must be an int >= 0, got {top_logprobs_num!r}")
        base = params.seed if params.seed is not None else self.seed_rng.getrandbits(63)
        return [TokenizedGenerateReq(uuid.uuid4().hex, input_ids, params, base + i, return_logprob,
                                     top_logprobs_num) for i in range(params.n)]

    # ---- streaming results ----------------------------------------------------------------------
    async def generate(self, req: TokenizedGenerateReq) -> AsyncIterator[dict]:
        """Sends one request and yields its cumulative result after every step; the last one is final."""
        state = ReqState(asyncio.get_running_loop(), asyncio.Queue(),
                         IncrementalDetokenizer(self.tokenizer, req.input_ids, req.sampling_params.stop,
                                                req.sampling_params.skip_special_tokens),
                         len(req.input_ids))
        self.rid_to_state[req.rid] = state
        self.send(req)
        try:
            while True:
                out = await state.queue.get()
                yield out
                if out["meta_info"]["finish_reason"] is not None:
                    return
        finally:
            if not state.finished:  # the consumer went away: free the request's KV in the scheduler
                self.send(AbortReq(req.rid))
            self.rid_to_state.pop(req.rid, None)

    def handle_batch_output(self, out: BatchTokenIDOutput) -> None:
        """Called with each scheduler output; safe to call from another thread than the requests' loops."""
        for i, rid in enumerate(out.rids):
            state = self.rid_to_state.get(rid)
            if state is None:
                continue  # aborted and already gone
            reason = out.finished_reasons[i]
            new = out.new_token_ids[i]
            state.output_ids += new
            state.logprobs += [(lp, t) for lp, t in zip(out.new_token_logprobs[i], new, strict=False)]
            state.top_logprobs += out.new_top_logprobs[i]
            delta = state.detok.add(new, reason is not None)
            state.finished = reason is not None
            result = {
                "text": state.detok.output_text,
                "delta": delta,
                "output_ids": list(state.output_ids),
                "meta_info": {
                    "id": rid,
                    "prompt_tokens": out.prompt_tokens[i],
                    "completion_tokens": out.completion_tokens[i],
                    "cached_tokens": out.cached_tokens[i],
                    "finish_reason": reason,
                    "output_token_logprobs": list(state.logprobs),
                    "output_top_logprobs": list(state.top_logprobs),
                    "e2e_latency": time.perf_counter() - state.created,
                },
            }
            state.loop.call_soon_threadsafe(state.queue.put_nowait, result)

    def fail_all(self, message: str) -> None:
        """The scheduler is gone: every waiting request ends with an error instead of hanging."""
        for rid, state in list(self.rid_to_state.items()):
            state.finished = True
            result = {"text": state.detok.output_text, "delta": "", "output_ids": list(state.output_ids),
                      "meta_info": {"id": rid, "prompt_tokens": state.prompt_tokens,
                                    "completion_tokens": len(state.output_ids), "cached_tokens": 0,
                                    "finish_reason": {"type": "abort", "message": message}}}
            state.loop.call_soon_threadsafe(state.queue.put_nowait, result)
