import torch
from torch import nn

from gridserve.forward_batch import ForwardBatch


class Attention(nn.Module):
    """Paged attention for one layer. The math lives in the batch's attention backend; this module only
    names the layer and its (per-rank) head shapes."""

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, layer_id: int, scaling: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.layer_id = layer_id
        self.scaling = scaling

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        return fb.attn_backend.forward(q, k, v, self, fb)
