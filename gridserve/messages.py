"""Every message that crosses a process boundary: TokenizerManager -> (DP controller ->) a replica's IO rank ->
detokenizer -> TokenizerManager, and with dp > 1 each replica's load reports (SchedulerStats) to the DP
controller. Plain dataclasses of Python values: pickled over ZMQ on one node, typed msgpack (wire.py) with several
nodes and between the ranks of a replica; tensors never travel here."""

from dataclasses import dataclass, field

from gridserve.sampling.sampling_params import SamplingParams

# Prompt tokens the detokenizer decodes before a request's first output tokens (see DetokInit), so tokenizers
# that treat the first token of a string specially give the same text as a full decode.
CONTEXT_TOKENS = 5


@dataclass
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    seed: int  # always set: the tokenizer side draws one when the user gave none
    return_logprob: bool = False
    top_logprobs_num: int = 0
    routed_dp_rank: int | None = None  # the DP replica the client asked for; None = the load balancer picks
    priority: int | None = None  # --enable-priority-scheduling: larger goes first (unless low values first)


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
    """A replica's answer to FlushCacheReq / GetInternalStateReq, matched by rid (one per replica)."""

    rid: str
    success: bool
    data: dict = field(default_factory=dict)
    dp_rank: int = 0


@dataclass
class SchedulerStats:
    """Load and cache figures of one replica after a scheduler step (for /metrics, /server_info and the DP
    controller's load reports)."""

    dp_rank: int = 0
    num_received: int = 0  # generate requests this replica has taken in since start (the DP controller's clock)
    tokens_in_flight: int = 0  # prompt + generated tokens of the running and waiting requests
    num_running: int = 0
    num_waiting: int = 0
    max_total_num_tokens: int = 0
    used_tokens: int = 0  # KV slots held by requests (not counting evictable cache)
    cached_tokens: int = 0  # KV slots held by the radix cache
    num_retracted: int = 0
    num_evicted_tokens: int = 0
    prompt_tokens_total: int = 0
    cached_prompt_tokens_total: int = 0
    gen_throughput: float = 0.0  # decode tokens/s over the last log interval (SGLang's gen_throughput)
    num_queue_full: int = 0  # requests refused since start because the waiting queue was full
    queue_times: list[float] = field(default_factory=list)  # seconds waited by requests admitted since the last send

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
class ReqOutputs:
    """The per-request fields of one scheduler step, one list per field, entry i for request rids[i] (columns
    pickle several times faster than one object per request). The one definition of these fields: the
    detokenizer passes them on untouched and the TokenizerManager reads them by index, so a new field is one
    line here plus where the scheduler fills it and the TokenizerManager reads it.

    finished_reasons[i] is None while request i runs, else {"type": "stop" | "length" | "abort", "matched": token
    id or stop string, "message": ...}."""

    rids: list[str] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)
    finished_reasons: list[dict | None] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    # per new token: its logprob, and the top-k alternatives as (logprob, token id)
    new_token_logprobs: list[list[float]] = field(default_factory=list)
    new_top_logprobs: list[list[list[tuple[float, int]]]] = field(default_factory=list)

    @classmethod
    def aborted(cls, rid: str, message: str, prompt_tokens: int, completion_tokens: int) -> "ReqOutputs":
        """One request that ends with an error and no new tokens (the front end's own, when a process died)."""
        return cls([rid], [[]], [{"type": "abort", "message": message}], [prompt_tokens], [completion_tokens], [0],
                   [[]], [[]])


@dataclass
class BatchTokenIDOutput:
    """One scheduler step's new tokens, per request; detok_init[i] is set on request i's first output."""

    reqs: ReqOutputs
    detok_init: list[DetokInit | None] = field(default_factory=list)
    stats: SchedulerStats | None = None


@dataclass
class BatchStrOutput:
    """BatchTokenIDOutput after detokenization: `text_deltas[i]` is the new visible text of request i."""

    reqs: ReqOutputs
    text_deltas: list[str]
    stats: SchedulerStats | None = None


@dataclass
class NodeMessage:
    """Between node 0's launcher and another node's (the node link). kind: "ready" (the node's ranks are up:
    their names and scheduler_info), "heartbeat" (both ways), "failed" (a process of the node died: reason),
    "stop" (node 0 is shutting the deployment down)."""

    kind: str
    node_rank: int
    address: str = ""
    ranks: list[str] = field(default_factory=list)
    infos: list[dict] = field(default_factory=list)
    reason: str = ""
