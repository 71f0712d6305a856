"""Vocabulary-parallel embedding and LM head: each TP rank holds a contiguous slice of the (padded) vocab."""

import torch
import torch.nn.functional as F
from torch import nn

from gridserve.distributed.parallel_state import get_tp_group


def pad_vocab(vocab_size: int, tp_size: int) -> int:
    return -(-vocab_size // tp_size) * tp_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.shard_size = pad_vocab(vocab_size, self.tp.size) // self.tp.size
        self.vocab_start = self.tp.rank * self.shard_size
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.zeros(self.shard_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        rows = max(0, min(self.shard_size, self.vocab_size - self.vocab_start))
        if rows:
            param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.shard_size)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Computes this rank's slice of the logits, gathers them, and trims the vocab padding."""

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits in the weights' dtype; `out` (rows, vocab), when given at tp 1, receives them."""
        if out is not None and self.tp.size == 1 and out.shape == (hidden.shape[0], self.shard_size):
            return torch.matmul(hidden, self.weight.t(), out=out)
        logits = F.linear(hidden, self.weight)
        logits = self.tp.all_gather(logits, dim=-1)
        return logits[..., : self.vocab_size]
