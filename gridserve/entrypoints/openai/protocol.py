"""Request and response bodies of the OpenAI-compatible API and of SGLang's native /generate.

Requests are validated strictly for types (a string is not a number, `true` is not a count) so that a client
bug gets a 400 naming the field, but leniently for presence: a field sent as null means "the default", and
unknown fields are ignored (clients such as the OpenAI SDK or LangChain add their own). Value ranges of the
sampling fields are checked by SamplingParams, so the rules live in one place."""

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from gridserve.entrypoints.openai.output import MAX_TOP_LOGPROBS
from gridserve.sampling.sampling_params import MAX_N, is_encodable


def _encodable(text: str) -> str:
    if not is_encodable(text):
        raise ValueError("not valid Unicode (a lone UTF-16 surrogate such as \\ud800)")
    return text


# Every text field of a request: JSON may carry lone surrogates ("\ud800") that no tokenizer or encoder takes.
Text = Annotated[str, AfterValidator(_encodable)]

# vLLM's and OpenAI's default for /v1/completions; chat gets the whole remaining context instead.
DEFAULT_COMPLETION_MAX_TOKENS = 16

# Request fields that map one-to-one onto SamplingParams (values checked there).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens", "seed", "n")


class RequestModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(RequestModel):
    include_usage: bool | None = False


class SamplingFields(RequestModel):
    """The sampling knobs shared by completions and chat, with SGLang/vLLM's extras."""

    model: Text | None = None
    n: int | None = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    logit_bias: dict[str, float] | None = None
    routed_dp_rank: int | None = None  # SGLang's: pin the request to this data-parallel replica

    def sampling_dict(self) -> dict:
        return {k: getattr(self, k) for k in SAMPLING_FIELDS if getattr(self, k) is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False
    suffix: Text | None = None
    best_of: int | None = None


class TextPart(RequestModel):
    type: Text
    text: Text | None = None


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool | None = True
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class GenerateRequest(RequestModel):
    """SGLang's native /generate: one prompt or a batch, as text or token ids."""

    text: Text | list[Text] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool | None = False
    return_logprob: bool | None = False
    top_logprobs_num: int | None = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    rid: Text | list[Text] | None = None
    routed_dp_rank: int | None = None


REQUEST_FIELDS = {name for m in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions,
                                 GenerateRequest) for name in m.model_fields}


# ---- responses --------------------------------------------------------------------------------------------
class ResponseModel(BaseModel):
    pass


class PromptTokensDetails(ResponseModel):
    cached_tokens: int = 0


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(ResponseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(ResponseModel):
    content: list[ChatTokenLogprob] = []


class ChatMessageOut(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(ResponseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None

    def to_json(self) -> dict:
        d = self.model_dump()
        for choice in d["choices"]:  # a delta carries only what changed
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if d["usage"] is None:
            del d["usage"]
        return d


class CompletionChunk(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    def to_json(self) -> dict:
        d = self.model_dump()
        if d["usage"] is None:
            del d["usage"]
        return d


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "gridserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
