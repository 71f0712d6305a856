"""POST /v1/chat/completions: a conversation -> the model's chat template -> OpenAI chat completions."""

import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.responses import Response

from gridserve.entrypoints.http_errors import OpenAIError, bad_request, check_alive, check_model
from gridserve.entrypoints.openai.output import (
    TokenStrings,
    clamp_logprob,
    finish_reason,
    matched_stop,
    new_logprobs,
    usage,
)
from gridserve.entrypoints.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatMessageOut,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    Usage,
)
from gridserve.entrypoints.request_flow import (
    collect_finals,
    generate_all,
    off_loop_if_large,
    prepare_requests,
    sampling_params,
    streamed,
    tokenize,
)
from gridserve.entrypoints.responses import ORJSONResponse, cancel_on_disconnect
from gridserve.errors import InvalidParamError
from gridserve.messages import TokenizedGenerateReq

# Roles that chat templates rarely know, mapped to the ones they do.
_ROLE_ALIASES = {"developer": "system", "function": "tool"}


class OpenAIServingChat:
    def __init__(self, tm, token_strings: TokenStrings):
        self.tm = tm
        self.tokens = token_strings

    async def create_chat_completion(self, body: ChatCompletionRequest, request: Request) -> Response:
        tm = self.tm
        check_model(body.model, tm.served_model_name)
        check_alive(tm)
        _reject_unsupported(body)
        max_tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling_params(body.sampling_dict())
        messages = [_template_message(i, m) for i, m in enumerate(body.messages)]

        def template_and_tokenize() -> list[int]:
            try:
                prompt = tm.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt is not False)
            except InvalidParamError as e:
                raise bad_request(e) from e
            return tokenize(tm, prompt, param="messages")

        ids = await off_loop_if_large(sum(len(str(m.get("content") or "")) for m in messages), template_and_tokenize)
        # max_tokens=None: the whole room left after the prompt (vLLM's default for chat)
        reqs = prepare_requests(tm, [ids], params, max_tokens, return_logprob=bool(body.logprobs),
                                top_logprobs_num=body.top_logprobs or 0, prompt_param="messages",
                                max_tokens_param=max_tokens_param, routed_dp_rank=body.routed_dp_rank,
                                priority=body.priority)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            return streamed(tm, reqs, self._chunks(rid, body, reqs))
        finals = await cancel_on_disconnect(request, collect_finals(tm, reqs))
        choices = [ChatChoice(index=i, message=ChatMessageOut(content=out["text"]), finish_reason=finish_reason(out),
                              matched_stop=matched_stop(out),
                              logprobs=self._logprobs(out, 0, body.top_logprobs or 0) if body.logprobs else None)
                   for i, out in enumerate(finals)]
        response = ChatCompletionResponse(id=rid, model=tm.served_model_name, choices=choices,
                                          usage=Usage(**usage(finals, len(reqs))))
        return ORJSONResponse(response.model_dump())

    def _logprobs(self, out: dict, start: int, top_k: int) -> ChatLogprobs:
        chosen, tops = new_logprobs(out, start)
        content = []
        for k, (logprob, token_id) in enumerate(chosen):
            alternatives = [self._top(v, t) for v, t in tops[k][:top_k]] if k < len(tops) else []
            content.append(ChatTokenLogprob(token=self.tokens.text(token_id), logprob=clamp_logprob(logprob),
                                            bytes=self.tokens.bytes(token_id), top_logprobs=alternatives))
        return ChatLogprobs(content=content)

    def _top(self, logprob: float, token_id: int) -> TopLogprob:
        return TopLogprob(token=self.tokens.text(token_id), logprob=clamp_logprob(logprob),
                          bytes=self.tokens.bytes(token_id))

    async def _chunks(self, rid: str, body: ChatCompletionRequest,
                      reqs: list[TokenizedGenerateReq]) -> AsyncIterator[dict]:
        created, model = int(time.time()), self.tm.served_model_name

        def chunk(choice: ChatChunkChoice | None, usage_: dict | None = None) -> dict:
            return ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice] if choice else [],
                                       usage=Usage(**usage_) if usage_ else None).to_json()

        for i in range(len(reqs)):  # OpenAI opens every choice with the role, before any text
            yield chunk(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
        finals: list[dict] = [{}] * len(reqs)
        sent = [0] * len(reqs)  # tokens whose logprobs went out, per choice
        async with contextlib.aclosing(generate_all(self.tm, reqs)) as outs:
            async for i, out in outs:
                finals[i] = out
                logprobs = None
                if body.logprobs:
                    logprobs = self._logprobs(out, sent[i], body.top_logprobs or 0)
                    sent[i] += len(logprobs.content)
                reason = finish_reason(out)
                if not out["delta"] and reason is None and not (logprobs and logprobs.content):
                    continue  # text held back (a possible stop string, half a character): nothing to say yet
                delta = DeltaMessage(content=out["delta"] if out["delta"] or reason is None else None)
                yield chunk(ChatChunkChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=reason,
                                            matched_stop=matched_stop(out)))
        if body.include_usage:
            yield chunk(None, usage(finals, len(reqs)))


def _template_message(i: int, m: ChatMessage) -> dict:
    """A message as chat templates expect it: plain-text content, roles they know."""
    content = m.content
    if isinstance(content, list):
        if any(part.type != "text" or part.text is None for part in content):
            raise OpenAIError(400, "only text content parts are supported", param=f"messages[{i}].content")
        content = "\n".join(part.text for part in content)
    message = {"role": _ROLE_ALIASES.get(m.role, m.role), "content": content or ""}
    if m.name is not None:
        message["name"] = m.name
    return message


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    """Fields we know but do not implement: an error beats silently returning something else."""
    if body.tools:
        raise OpenAIError(400, "tool calling is not supported", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise OpenAIError(400, "structured output (response_format) is not supported", param="response_format")
    if body.logit_bias:
        raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")
    if body.top_logprobs and not body.logprobs:
        raise OpenAIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
