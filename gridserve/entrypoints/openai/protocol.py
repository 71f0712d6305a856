"""Request and response bodies of the OpenAI-compatible API and of SGLang's native /generate.

Requests are validated strictly for types (a string is not a number, `true` is not a count, 2.0 is not an integer)
so that a client bug gets a 400 naming the field, but leniently for presence: a field sent as null means "the
default", and unknown fields of a request are ignored, as OpenAI's SDKs and vLLM expect (clients such as LangChain
add their own). The one closed object is /generate's `sampling_params`: its keys are SamplingParams' fields, and a
misspelt one (`max_tokens` for `max_new_tokens`) is a 400 rather than a silently different generation. Value ranges
of the sampling fields are checked by SamplingParams, so the rules live in one place; the OpenAPI schema publishes
them from there (`field_schema`).

The response models document what the routes send (the OpenAPI schema is built from them); the handlers build their
bodies with them, so the two stay the same."""

import copy
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from gridserve.entrypoints.openai.output import MAX_TOP_LOGPROBS
from gridserve.sampling.sampling_params import MAX_N, SamplingParams, field_schema, is_encodable


def _encodable(text: str) -> str:
    if not is_encodable(text):
        raise ValueError("not valid Unicode (a lone UTF-16 surrogate such as \\ud800)")
    return text


# Every text field of a request: JSON may carry lone surrogates ("\ud800") that no tokenizer or encoder takes.
Text = Annotated[str, AfterValidator(_encodable)]


def _integral(value: Any) -> Any:
    # JSON has one number type, and JSON Schema's `integer` admits 2.0: it is the integer 2 (2.5 stays an error)
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Every integer field of a request (bounds go before the validator: after it, pydantic's schema gets them wrong).
Int = Annotated[int, BeforeValidator(_integral)]
N = Annotated[int, Field(ge=1, le=MAX_N), BeforeValidator(_integral)]
MaxTokens = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), BeforeValidator(_integral)]

# Limits that depend on the model served, marked in the schema by this key and filled in by the HTTP server's
# /openapi.json: "vocab" the largest token id, "context" the most tokens a request may generate (the context and KV
# cache less one prompt token), "dp_rank" the last data-parallel replica.
SERVED_MAX = "x-gridserve-max"

# A prompt given as token ids: ids of the vocabulary (tokenize checks them), at least one.
TokenId = Annotated[Int, WithJsonSchema({"type": "integer", "minimum": 0, SERVED_MAX: "vocab"})]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
# A prompt given as text: at least one character (an empty prompt is a 400).
PromptText = Annotated[Text, Field(min_length=1)]

# vLLM's and OpenAI's default for /v1/completions; chat gets the whole remaining context instead.
DEFAULT_COMPLETION_MAX_TOKENS = 16

# Request fields that map one-to-one onto SamplingParams (values checked there).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens", "seed", "n")


class RequestModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _schema_of(schema: dict[str, Any]):
    """json_schema_extra that replaces a field's generated schema with `schema`: for fields that a handler or
    SamplingParams checks, so that the schema says what they accept."""

    def replace(generated: dict[str, Any]) -> None:
        generated.clear()
        generated.update(copy.deepcopy(schema))  # FastAPI edits schemas in place: never share one

    return replace


def _sampling_field(name: str) -> Any:
    """A field that goes to SamplingParams as it is: SamplingParams checks its value."""
    return Field(None, json_schema_extra=_schema_of(field_schema(name)))


def _max_tokens(default: int | None) -> Any:
    return Field(default, json_schema_extra={SERVED_MAX: "context"})


# Fields we know but do not implement (a 400 says so): what the schema allows of them is what the handler takes.
_UNSUPPORTED = {
    "echo": {"enum": [False, None]},
    "suffix": {"type": ["string", "null"], "maxLength": 0},
    "logit_bias": {"type": ["object", "null"], "maxProperties": 0},
    "tools": {"type": ["array", "null"], "maxItems": 0},
    "response_format": {"type": ["object", "null"], "properties": {"type": {"const": "text"}}},
}


def _unsupported(name: str, default: Any = None) -> Any:
    return Field(default, json_schema_extra=_schema_of(_UNSUPPORTED[name]))


def _sampling_params_schema() -> dict[str, Any]:
    schema = SamplingParams.json_schema()
    schema["properties"]["max_new_tokens"][SERVED_MAX] = "context"
    return schema


def _exactly_one_of(a: str, b: str):
    """json_schema_extra for a model that needs exactly one of two fields (null counts as absent)."""

    def add(schema: dict[str, Any]) -> None:
        schema["oneOf"] = [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in (a, b)]

    return add


class StreamOptions(RequestModel):
    include_usage: bool | None = False


class SamplingFields(RequestModel):
    """The sampling knobs shared by completions and chat, with SGLang/vLLM's extras."""

    model: Text | None = None
    n: N | None = 1
    temperature: float | None = _sampling_field("temperature")
    top_p: float | None = _sampling_field("top_p")
    top_k: Int | None = _sampling_field("top_k")
    min_p: float | None = _sampling_field("min_p")
    repetition_penalty: float | None = _sampling_field("repetition_penalty")
    frequency_penalty: float | None = _sampling_field("frequency_penalty")
    presence_penalty: float | None = _sampling_field("presence_penalty")
    stop: Text | list[Text] | None = _sampling_field("stop")
    stop_token_ids: list[Int] | None = _sampling_field("stop_token_ids")
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    seed: Int | None = _sampling_field("seed")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    logit_bias: dict[str, float] | None = _unsupported("logit_bias")
    # SGLang's: pin the request to this data-parallel replica
    routed_dp_rank: Int | None = Field(None, json_schema_extra={"minimum": 0, SERVED_MAX: "dp_rank"})
    # SGLang's: with --enable-priority-scheduling, larger goes first (ignored otherwise)
    priority: Int | None = Field(None, ge=-2**63, le=2**63 - 1)

    def sampling_dict(self) -> dict:
        return {k: getattr(self, k) for k in SAMPLING_FIELDS if getattr(self, k) is not None}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1)]
    max_tokens: MaxTokens | None = _max_tokens(DEFAULT_COMPLETION_MAX_TOKENS)
    logprobs: TopLogprobs | None = None
    echo: bool | None = _unsupported("echo", False)
    suffix: Text | None = _unsupported("suffix")
    best_of: Int | None = None


class TextPart(RequestModel):
    # The handler refuses other parts (image_url, ...) with a 400 that says so; the schema says it too.
    model_config = ConfigDict(json_schema_extra=_schema_of({
        "type": "object", "required": ["type", "text"], "title": "TextPart",
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}))

    type: Text
    text: Text | None = None


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = _max_tokens(None)
    max_completion_tokens: MaxTokens | None = _max_tokens(None)
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    add_generation_prompt: bool | None = True
    tools: list[Any] | None = _unsupported("tools")
    tool_choice: Any = None
    response_format: dict[str, Any] | None = _unsupported("response_format")


class GenerateRequest(RequestModel):
    """SGLang's native /generate: one prompt or a batch, as text or token ids."""

    model_config = ConfigDict(json_schema_extra=_exactly_one_of("text", "input_ids"))

    text: PromptText | Annotated[list[PromptText], Field(min_length=1)] | None = None
    input_ids: TokenIds | Annotated[list[TokenIds], Field(min_length=1)] | None = None
    # one for all prompts, or one per prompt; SamplingParams.from_dict checks the keys and values
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = Field(None, json_schema_extra=_schema_of({
        "anyOf": [_sampling_params_schema(), {"type": "array", "items": _sampling_params_schema()},
                  {"type": "null"}]}))
    stream: bool | None = False
    return_logprob: bool | None = False
    top_logprobs_num: TopLogprobs | None = 0
    rid: Text | list[Text] | None = None
    routed_dp_rank: Int | None = Field(None, json_schema_extra={"minimum": 0, SERVED_MAX: "dp_rank"})
    # SGLang's: with --enable-priority-scheduling, larger goes first (ignored otherwise)
    priority: Int | None = Field(None, ge=-2**63, le=2**63 - 1)


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
    matched_stop: int | str | None = None  # SGLang's: the stop token id or string that ended it


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
    matched_stop: int | str | None = None  # SGLang's: the stop token id or string that ended it


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
    matched_stop: int | str | None = None  # SGLang's: the stop token id or string that ended it


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


class ErrorDetail(ResponseModel):
    message: str = Field(min_length=1)
    type: str
    param: str | None = Field(description="the offending field, e.g. `messages[0].content`")
    code: str | None


class ErrorResponse(ResponseModel):
    """Every failure, as OpenAI sends it (OpenAIError.body())."""

    error: ErrorDetail


# ---- /generate (SGLang's native API) -----------------------------------------------------------------------
class GenerateFinishReason(ResponseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["stop", "length", "abort"]
    matched: int | str | None = Field(None, description="stop: the token id or stop string that ended it")
    message: str | None = Field(None, description="abort: why")


# A logprob and its token id; null stands for -inf (JSON has no infinities).
TokenLogprob = tuple[float | None, int]


class GenerateMetaInfo(ResponseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: GenerateFinishReason | None
    output_token_logprobs: list[TokenLogprob] | None = Field(None, description="with return_logprob only")
    output_top_logprobs: list[list[TokenLogprob]] | None = Field(None, description="with return_logprob only")
    ttft: float | None = None
    e2e_latency: float | None = None


class GenerateResult(ResponseModel):
    """One generation; a batch answers a list of them. Stream events are the cumulative result so far, with
    `index` when the request has several generations."""

    text: str
    output_ids: list[int]
    meta_info: GenerateMetaInfo
    index: int | None = Field(None, description="streams of several generations only")
