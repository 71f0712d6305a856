import torch
from torch import nn

from gridserve.attention.base import QKRotation
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

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, fb: ForwardBatch,
                rotation: QKRotation | None = None) -> torch.Tensor:
        """k and v None: the caller has written them into the cache already (see fused_kv_store). `rotation`:
        q and k are raw and the backend's decode kernel norms and rotates them (see rotates_in_decode)."""
        return fb.attn_backend.forward(q, k, v, self, fb, rotation)

    def rotates_in_decode(self, fb: ForwardBatch) -> bool:
        """Whether the backend's decode kernel applies the rotary embedding (and q/k norm) and stores the new K/V
        itself this batch: the caller then passes q, k and v raw, with a QKRotation."""
        return fb.attn_backend.rotates_in_decode(fb)

    def fused_kv_store(self, fb: ForwardBatch, v: torch.Tensor) -> tuple | None:
        """(k_cache, v_cache, slots, v) for the rotary kernel to write this layer's new K/V itself, or None.
        Decode on CUDA only: one kernel per layer saved where the whole step is a few dozen small kernels
        (prefill's piecewise graphs store K/V at the attention cut, outside the captured pieces)."""
        if not (v.is_cuda and fb.forward_mode.is_decode()):
            return None
        return (*fb.kv_cache.get_kv(self.layer_id), fb.out_cache_loc, v)
