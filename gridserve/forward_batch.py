"""ForwardBatch: what one model forward needs, as tensors. Built by the scheduler, read by the model,
the attention backend and the logits step."""

from dataclasses import dataclass
from enum import Enum, auto
from itertools import accumulate

import torch

from gridserve.tensor_utils import to_device


class ForwardMode(Enum):
    EXTEND = auto()  # prefill of new tokens, possibly after a cached prefix (also a chunk of a long prompt)
    DECODE = auto()  # one new token per request

    def is_extend(self) -> bool:
        return self is ForwardMode.EXTEND

    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # (N,) all new tokens of the batch, flattened
    positions: torch.Tensor  # (N,)
    req_pool_indices: torch.Tensor  # (B,) rows of req_to_token
    seq_lens: torch.Tensor  # (B,) tokens with KV after this step (prefix + new)
    out_cache_loc: torch.Tensor  # (N,) KV slots the new tokens are written to
    seq_lens_cpu: list[int]
    # extend only
    extend_seq_lens_cpu: list[int] | None = None  # new tokens per request
    extend_seq_lens: torch.Tensor | None = None  # (B,) int64 on the device; made from the list when not given
    extend_start_loc: torch.Tensor | None = None  # (B,) int64: where each request's new tokens start
    # logits of every position instead of only the last one per request (tests, prompt logprobs)
    return_all_logits: bool = False
    # where the LM head writes the logits, (B, vocab), if given: the decode graphs share one output buffer
    logits_out: torch.Tensor | None = None
    # filled by the model runner
    req_to_token: torch.Tensor | None = None
    kv_cache: object = None
    attn_backend: object = None

    def __post_init__(self) -> None:
        if self.forward_mode.is_extend() and self.extend_seq_lens is None:
            dev = self.input_ids.device
            self.extend_seq_lens = to_device(self.extend_seq_lens_cpu, torch.int64, dev)
            self.extend_start_loc = to_device(self.extend_start_loc_cpu, torch.int64, dev)

    @property
    def extend_start_loc_cpu(self) -> list[int]:
        return start_offsets(self.extend_seq_lens_cpu)


def start_offsets(lens: list[int]) -> list[int]:
    """Where each request's tokens start in the flattened batch."""
    return [0, *accumulate(lens)][: len(lens)]
