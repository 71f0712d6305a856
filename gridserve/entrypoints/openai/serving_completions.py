"""POST /v1/completions: prompts (text or token ids, one or a batch) -> OpenAI text completions."""

import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import Response

from gridserve.entrypoints.http_errors import OpenAIError, check_alive, check_batch_size, check_model
from gridserve.entrypoints.openai.output import (
    TokenStrings,
    clamp_logprob,
    finish_reason,
    matched_stop,
    new_logprobs,
    usage,
)
from gridserve.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from gridserve.entrypoints.request_flow import (
    collect_finals,
    generate_all,
    off_loop_if_large,
    prepare_requests,
    sampling_params,
    streamed,
    text_size,
    tokenize,
)
from gridserve.entrypoints.responses import ORJSONResponse, cancel_on_disconnect
from gridserve.messages import TokenizedGenerateReq


class OpenAIServingCompletion:
    def __init__(self, tm, token_strings: TokenStrings):
        self.tm = tm
        self.tokens = token_strings

    async def create_completion(self, body: CompletionRequest, request: Request) -> Response:
        tm = self.tm
        check_model(body.model, tm.served_model_name)
        check_alive(tm)
        _reject_unsupported(body)
        params = sampling_params(body.sampling_dict())
        single = isinstance(body.prompt, str) or bool(body.prompt) and isinstance(body.prompt[0], int)
        check_batch_size(1 if single else len(body.prompt), params.n)  # before any tokenizing
        prompts = await off_loop_if_large(text_size([body.prompt] if single else body.prompt),
                                          lambda: self._prompts(body.prompt))
        reqs = prepare_requests(tm, prompts, params, body.max_tokens,
                                return_logprob=body.logprobs is not None, top_logprobs_num=body.logprobs or 0,
                                routed_dp_rank=body.routed_dp_rank, priority=body.priority)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            return streamed(tm, reqs, self._chunks(rid, body, reqs, params.n))
        finals = await cancel_on_disconnect(request, collect_finals(tm, reqs))
        choices = [CompletionChoice(index=i, text=out["text"], finish_reason=finish_reason(out),
                                    matched_stop=matched_stop(out),
                                    logprobs=self._logprobs(out, 0, 0)[0] if body.logprobs is not None else None)
                   for i, out in enumerate(finals)]
        response = CompletionResponse(id=rid, model=tm.served_model_name, choices=choices,
                                      usage=Usage(**usage(finals, params.n)))
        return ORJSONResponse(response.model_dump())

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """Token ids of every prompt of the request, in order."""
        if isinstance(prompt, str):
            return [tokenize(self.tm, prompt)]
        if not prompt:
            raise OpenAIError(400, "prompt: the prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [tokenize(self.tm, input_ids=prompt)]
        if isinstance(prompt[0], str):
            return [tokenize(self.tm, p) for p in prompt]
        return [tokenize(self.tm, input_ids=ids) for ids in prompt]

    def _logprobs(self, out: dict, start: int, offset: int) -> tuple[CompletionLogprobs, int]:
        """Logprobs of the tokens from `start` on; `offset` is the text length before them. Returns the new
        text length too, for the next streamed chunk."""
        chosen, tops = new_logprobs(out, start)
        lp = CompletionLogprobs()
        for k, (logprob, token_id) in enumerate(chosen):
            text = self.tokens.text(token_id)
            lp.tokens.append(text)
            lp.token_logprobs.append(clamp_logprob(logprob))
            alternatives = {self.tokens.text(t): clamp_logprob(v) for v, t in (tops[k] if k < len(tops) else [])}
            alternatives.setdefault(text, clamp_logprob(logprob))  # the chosen token is always listed
            lp.top_logprobs.append(alternatives)
            lp.text_offset.append(offset)
            offset += len(text)
        return lp, offset

    async def _chunks(self, rid: str, body: CompletionRequest, reqs: list[TokenizedGenerateReq],
                      n: int) -> AsyncIterator[dict]:
        created, model = int(time.time()), self.tm.served_model_name
        finals: list[dict] = [{}] * len(reqs)
        sent = [0] * len(reqs)  # tokens whose logprobs went out, per choice
        offsets = [0] * len(reqs)
        async with contextlib.aclosing(generate_all(self.tm, reqs)) as outs:
            async for i, out in outs:
                finals[i] = out
                logprobs = None
                if body.logprobs is not None:
                    logprobs, offsets[i] = self._logprobs(out, sent[i], offsets[i])
                    sent[i] = len(out["meta_info"]["output_token_logprobs"])
                reason = finish_reason(out)
                if not out["delta"] and reason is None and not (logprobs and logprobs.tokens):
                    continue  # text held back (a possible stop string, half a character): nothing to say yet
                choice = CompletionChoice(index=i, text=out["delta"], logprobs=logprobs, finish_reason=reason,
                                          matched_stop=matched_stop(out))
                yield CompletionChunk(id=rid, created=created, model=model, choices=[choice]).to_json()
        if body.include_usage:
            yield CompletionChunk(id=rid, created=created, model=model, choices=[],
                                  usage=Usage(**usage(finals, n))).to_json()


def _reject_unsupported(body: CompletionRequest) -> None:
    """Fields we know but do not implement: an error beats silently returning something else."""
    if body.echo:
        raise OpenAIError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of not in (1, body.n):
        raise OpenAIError(400, "best_of other than n is not supported", param="best_of")
    if body.logit_bias:
        raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")
