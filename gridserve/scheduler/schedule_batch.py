"""Request state on the scheduler side, and the batch that turns a list of requests into a ForwardBatch."""

import torch

from gridserve.model_executor.forward_batch import ForwardBatch, ForwardMode
from gridserve.sampling.sampler import SamplingBatchInfo
from gridserve.sampling.sampling_params import SamplingParams


class Req:
    def __init__(self, rid: str, input_ids: list[int], params: SamplingParams, seed: int,
                 return_logprob: bool = False, top_logprobs_num: int = 0):
        self.rid = rid
        self.origin_input_ids = input_ids
        self.output_ids: list[int] = []
        self.params = params
        self.seed = seed
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num
        # KV state: req_to_token[req_pool_idx, :kv_len] are this request's KV slots; the first cached_len
        # of them belong to the radix tree (locked through last_node), the rest are private.
        self.req_pool_idx: int | None = None
        self.kv_len = 0
        self.cached_len = 0
        self.last_node = None
        self.extend_len = 0  # tokens computed in the current extend step
        self.cached_tokens = 0  # prefix-cache hit at first admission, reported to the user
        self.admitted = False
        self.finished_reason: dict | None = None
        self.sent_len = 0  # output tokens already sent out
        self.detok_started = False  # the detokenizer has this request's DetokInit
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[float, int]]] = []

    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    def reset_kv(self) -> None:
        """Forget the KV state (after retraction); it is recomputed from fill_ids on re-admission."""
        self.req_pool_idx = None
        self.kv_len = self.cached_len = self.extend_len = 0
        self.last_node = None


class ScheduleBatch:
    def __init__(self, reqs: list[Req], mode: ForwardMode):
        self.reqs = reqs
        self.mode = mode

    def to_forward_batch(self, req_to_token: torch.Tensor, out_cache_loc: torch.Tensor,
                         device: torch.device) -> ForwardBatch:
        """Writes the new slots into req_to_token and builds the model inputs."""
        ids, pos, starts = [], [], []
        for r in self.reqs:
            fill = r.fill_ids
            ids += fill[r.kv_len : r.kv_len + r.extend_len]
            pos += range(r.kv_len, r.kv_len + r.extend_len)
        seq_lens = [r.kv_len + r.extend_len for r in self.reqs]
        offset = 0
        for r in self.reqs:
            req_to_token[r.req_pool_idx, r.kv_len : r.kv_len + r.extend_len] = \
                out_cache_loc[offset : offset + r.extend_len].to(torch.int32)
            starts.append(offset)
            offset += r.extend_len
        return ForwardBatch(
            forward_mode=self.mode,
            batch_size=len(self.reqs),
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(pos, dtype=torch.long, device=device),
            req_pool_indices=torch.tensor([r.req_pool_idx for r in self.reqs], device=device),
            seq_lens=torch.tensor(seq_lens, device=device),
            out_cache_loc=out_cache_loc,
            seq_lens_cpu=seq_lens,
            extend_seq_lens_cpu=[r.extend_len for r in self.reqs],
        )

    def sampling_info(self, vocab_size: int, device: torch.device) -> SamplingBatchInfo:
        rs = self.reqs
        return SamplingBatchInfo.build([r.params for r in rs], [r.seed for r in rs], [len(r.output_ids) for r in rs],
                                       [r.origin_input_ids for r in rs], [r.output_ids for r in rs], vocab_size,
                                       device)
