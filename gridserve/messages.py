"""Every message that crosses a process boundary: TokenizerManager -> scheduler -> detokenizer ->
TokenizerManager. Plain dataclasses of Python values (pickled over ZMQ); tensors never travel here."""

from dataclasses import dataclass, field

from gridserve.sampling.sampling_params import SamplingParams


@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    seed: int  # always set: the tokenizer side draws one when the user gave none
    return_logprob: bool = False
    top_logprobs_num: int = 0


@dataclass
class AbortReq:
    rid: str


@dataclass
class FlushCacheReq:
    rid: str = ""


@dataclass
class GetInternalStateReq:
    rid: str = ""


@dataclass
class RpcOutput:
    """The scheduler's answer to FlushCacheReq / GetInternalStateReq, matched by rid."""

    rid: str
    success: bool
    data: dict = field(default_factory=dict)


@dataclass
class SchedulerStats:
    """Load and cache figures after a scheduler step (for /metrics, /server_info and the DP controller)."""

    num_running: int = 0
    num_waiting: int = 0
    max_total_num_tokens: int = 0
    used_tokens: int = 0  # KV slots held by requests (not counting evictable cache)
    cached_tokens: int = 0  # KV slots held by the radix cache
    num_retracted: int = 0
    num_evicted_tokens: int = 0
    prompt_tokens_total: int = 0
    cached_prompt_tokens_total: int = 0

    @property
    def token_usage(self) -> float:
        return self.used_tokens / max(1, self.max_total_num_tokens)

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_prompt_tokens_total / max(1, self.prompt_tokens_total)


@dataclass
class DetokInit:
    """Sent with a request's first output, so the detokenizer can start its incremental state."""

    prompt_tail: list[int]
    stop: list[str]
    skip_special_tokens: bool


@dataclass
class BatchTokenIDOutput:
    """One scheduler step's new tokens, per request. finished_reasons[i] is None while request i runs,
    else {"type": "stop" | "length" | "abort", "matched": token id or stop string, "message": ...}."""

    rids: list[str]
    new_token_ids: list[list[int]]
    finished_reasons: list[dict | None]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    # per new token: its logprob, and the top-k alternatives as (logprob, token id)
    new_token_logprobs: list[list[float]] = field(default_factory=list)
    new_top_logprobs: list[list[list[tuple[float, int]]]] = field(default_factory=list)
    detok_init: list[DetokInit | None] = field(default_factory=list)
    stats: SchedulerStats | None = None


@dataclass
class BatchStrOutput:
    """BatchTokenIDOutput after detokenization: `text_deltas[i]` is the new visible text of request i."""

    rids: list[str]
    text_deltas: list[str]
    new_token_ids: list[list[int]]
    finished_reasons: list[dict | None]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    new_token_logprobs: list[list[float]]
    new_top_logprobs: list[list[list[tuple[float, int]]]]
    stats: SchedulerStats | None = None
