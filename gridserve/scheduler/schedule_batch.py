"""Request state on the scheduler side, and the batch that turns a list of requests into a ForwardBatch."""

import time

import torch

from gridserve.forward_batch import ForwardBatch, ForwardMode, start_offsets
from gridserve.sampling.sampler import SamplingBatchInfo
from gridserve.sampling.sampling_params import SamplingParams
from gridserve.tensor_utils import to_device


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
        self.priority = 0  # --enable-priority-scheduling
        self.preemptions = 0  # times a higher-priority request took its place (bounded: MAX_PREEMPTIONS)
        self.arrival_time = time.perf_counter()  # for the queue time, measured up to its first admission
        self.finished_reason: dict | None = None
        self.sent_len = 0  # output tokens already sent out
        self.detok_started = False  # the detokenizer has this request's DetokInit
        self.finish_sent = False
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[float, int]]] = []
        # Tokens sampled on the device whose ids the host has not read yet (the overlap loop runs one step
        # ahead); the newest of them is row `last_row` of the latest launched batch's output.
        self.pending = 0
        self.last_row = -1

    @property
    def fill_ids(self) -> list[int]:
        """The tokens whose ids the host knows: prompt + resolved output."""
        return self.origin_input_ids + self.output_ids

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) + self.pending

    @property
    def num_tokens(self) -> int:
        return len(self.origin_input_ids) + self.num_generated

    def token_ids(self, start: int, end: int) -> list[int]:
        """Ids of tokens [start, end); a token still on the device is the placeholder -1 - last_row."""
        prompt, out = self.origin_input_ids, self.output_ids
        known = len(prompt) + len(out)
        stop = min(end, known)
        if start >= len(prompt):  # a decode step: no copy of the whole context
            ids = out[start - len(prompt) : stop - len(prompt)]
        else:
            ids = prompt[start:stop] + out[: max(0, stop - len(prompt))]
        if end > known:
            assert self.pending == 1 and end == known + 1, "only the newest token can be unresolved"
            ids.append(-1 - self.last_row)
        return ids

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
        # set at launch: the sampled tokens (on the device) and which requests take one from this step
        self.result = None
        self.samples: list[bool] = []

    def to_forward_batch(self, req_to_token: torch.Tensor, out_cache_loc: torch.Tensor, device: torch.device,
                         prev_tokens: torch.Tensor | None) -> ForwardBatch:
        """Writes the new slots into req_to_token and builds the model inputs with one host-to-device copy.

        A request's newest token may still be on the device (sampled by the previous, unprocessed batch); its
        id is then a placeholder -1 - row, resolved here from that batch's `prev_tokens` without a host sync.
        """
        ids, pos, rows, holes, hole_rows = [], [], [], [], []
        for r in self.reqs:
            part = r.token_ids(r.kv_len, r.kv_len + r.extend_len)
            ids += part
            if part and part[-1] < 0:  # only a request's newest token can be a placeholder
                holes.append(len(ids) - 1)
                hole_rows.append(-1 - part[-1])
            pos += range(r.kv_len, r.kv_len + r.extend_len)
            rows += [r.req_pool_idx] * r.extend_len
        n, b, h = len(ids), len(self.reqs), len(holes)
        seq_lens = [r.kv_len + r.extend_len for r in self.reqs]
        ext_lens = [r.extend_len for r in self.reqs]
        flat = to_device(ids + pos + rows + [r.req_pool_idx for r in self.reqs] + seq_lens + ext_lens
                         + start_offsets(ext_lens) + holes + hole_rows, torch.int64, device)
        input_ids, positions, token_rows = flat[:n], flat[n : 2 * n], flat[2 * n : 3 * n]
        req_pool_indices, dev_seq_lens, dev_ext_lens, dev_starts = flat[3 * n : 3 * n + 4 * b].view(4, b)
        if h == n and h:  # every id is still on the device (a decode step of the overlap loop): one gather
            input_ids = prev_tokens[flat[-h:]]
        elif h:
            input_ids[flat[-2 * h : -h]] = prev_tokens[flat[-h:]]
        req_to_token[token_rows, positions] = out_cache_loc.to(torch.int32)
        is_extend = self.mode.is_extend()
        return ForwardBatch(
            forward_mode=self.mode,
            batch_size=b,
            input_ids=input_ids,
            positions=positions,
            req_pool_indices=req_pool_indices,
            seq_lens=dev_seq_lens,
            out_cache_loc=out_cache_loc,
            seq_lens_cpu=seq_lens,
            extend_seq_lens_cpu=ext_lens,
            extend_seq_lens=dev_ext_lens if is_extend else None,
            extend_start_loc=dev_starts if is_extend else None,
        )

    def sampling_info(self, vocab_size: int, device: torch.device, prev_tokens: torch.Tensor | None
                      ) -> SamplingBatchInfo:
        rs = self.reqs
        pending = None
        if any(r.pending for r in rs) and any(r.params.has_penalties for r in rs):
            rows = to_device([r.last_row if r.pending else -1 for r in rs], torch.int64, device)
            pending = torch.where(rows >= 0, prev_tokens[rows.clamp(min=0)], -1)
        return SamplingBatchInfo.build([r.params for r in rs], [r.seed for r in rs], [r.num_generated for r in rs],
                                       [r.origin_input_ids for r in rs], [r.output_ids for r in rs], vocab_size,
                                       device, pending)
