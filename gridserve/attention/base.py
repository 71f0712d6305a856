"""The interface every attention backend implements.

A backend stores the new K/V into the paged cache and attends over each request's KV slots, found through
`req_to_token[req_pool_indices, :seq_len]`. `init_forward_metadata` runs once per batch, before the layers,
so a backend can precompute index tensors. A backend that supports CUDA graphs needs no host values in decode
(it reads lengths and slots from the batch's device tensors) and keeps its scratch buffers for the largest
captured batch.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from gridserve.forward_batch import ForwardBatch


@dataclass
class QKRotation:
    """The rotary embedding, and the per-head q/k RMSNorm where the model has one (Qwen3), that a backend whose
    `rotates_in_decode` is true applies to a decode step's raw q and new k itself, storing the new K/V too."""

    positions: torch.Tensor  # (B,)
    inv_freq: torch.Tensor  # (head_dim / 2,) float32
    scaling: float = 1.0
    q_weight: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    eps: float = 1e-6


class AttentionBackend(ABC):
    supports_cuda_graph: bool = False

    @abstractmethod
    def init_forward_metadata(self, fb: ForwardBatch) -> None: ...

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, layer, fb: ForwardBatch) -> None:
        """Writes the new tokens' K/V (N, Hkv*D) into the paged cache at fb.out_cache_loc."""
        fb.kv_cache.set_kv(layer.layer_id, fb.out_cache_loc, k.view(-1, layer.num_kv_heads, layer.head_dim),
                           v.view(-1, layer.num_kv_heads, layer.head_dim))

    @abstractmethod
    def extend_attend(self, q: torch.Tensor, layer, fb: ForwardBatch, out: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Causal attention of the new tokens q (N, Hq*D) over their requests' cached KV, which already holds
        the new tokens; returns (N, Hq*D), written into `out` when given."""

    def forward_extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, fb: ForwardBatch
                       ) -> torch.Tensor:
        self.store_kv(k, v, layer, fb)
        return self.extend_attend(q, layer, fb)

    @abstractmethod
    def forward_decode(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer,
                       fb: ForwardBatch) -> torch.Tensor:
        """One new token per request; k and v None when the caller stored them already (the fused rotary
        kernel, layers/attention.py)."""

    def long_prefix_bytes(self, context_len: int, prefill_tokens: int, num_heads: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype) -> int:
        """Memory a prefill after a cached prefix as long as the context takes beyond one without a prefix (which
        is what the start-up measures): none, unless the backend copies the prefix."""
        return 0

    def rotates_in_decode(self, fb: ForwardBatch) -> bool:
        """Whether this batch's decode kernel takes q and k raw (forward's `rotation`): one kernel fewer a layer."""
        return False

    def forward_decode_rotating(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, fb: ForwardBatch,
                                rotation: QKRotation) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not rotate q and k in its decode kernel")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, fb: ForwardBatch,
                rotation: QKRotation | None = None) -> torch.Tensor:
        """q: (N, Hq*D), k/v: (N, Hkv*D); returns (N, Hq*D). With `rotation` (decode, where rotates_in_decode),
        q and k are raw: the backend norms and rotates them and stores the new K/V in its decode kernel."""
        if fb.forward_mode.is_decode():
            if rotation is not None:
                return self.forward_decode_rotating(q, k, v, layer, fb, rotation)
            return self.forward_decode(q, k, v, layer, fb)
        return self.forward_extend(q, k, v, layer, fb)

    # CUDA-graph hook: allocate whatever decode needs at batch sizes up to max_bs once, so replays reuse it.
    def init_cuda_graph_state(self, max_bs: int, num_heads: int, head_dim: int, device: torch.device) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")
