"""Every message that crosses a process boundary (or, in single-process mode, a thread boundary).
Plain dataclasses of Python values: tensors never travel in messages."""

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
    pass


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
