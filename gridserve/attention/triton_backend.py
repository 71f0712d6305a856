"""Attention with the project's Triton kernels: paged split-KV decode. Extend (prefill with a cached
prefix) still runs the PyTorch reference path until its kernel lands."""

import torch

from gridserve.attention.torch_backend import TorchAttentionBackend
from gridserve.model_executor.forward_batch import ForwardBatch


class TritonAttentionBackend(TorchAttentionBackend):
    def __init__(self, num_kv_splits: int = 8):
        super().__init__()
        from gridserve.attention.triton_ops import DecodeWorkspace, decode_attention  # imports triton

        self._decode = decode_attention
        self._workspace_cls = DecodeWorkspace
        self.num_kv_splits = num_kv_splits
        self.workspace = None

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if fb.forward_mode.is_decode():
            return  # the kernel reads req_to_token itself: no gathered index table
        super().init_forward_metadata(fb)

    def _workspace_for(self, batch_size: int, num_heads: int, head_dim: int, device: torch.device):
        ws = self.workspace
        if ws is None or ws.attn_out.shape[0] < batch_size or ws.attn_out.shape[1] != num_heads:
            ws = self._workspace_cls.allocate(max(batch_size, 2 * (ws.attn_out.shape[0] if ws else 0)),
                                              num_heads, head_dim, self.num_kv_splits, device=device)
            self.workspace = ws
        return ws

    def forward_decode(self, q, k, v, layer, fb: ForwardBatch) -> torch.Tensor:
        k_buf, v_buf = fb.kv_cache.get_kv(layer.layer_id)
        fb.kv_cache.set_kv(layer.layer_id, fb.out_cache_loc, k.view(-1, layer.num_kv_heads, layer.head_dim),
                           v.view(-1, layer.num_kv_heads, layer.head_dim))
        b = fb.batch_size
        ws = self._workspace_for(b, layer.num_heads, layer.head_dim, q.device)
        out = self._decode(q.view(b, layer.num_heads, layer.head_dim), k_buf, v_buf, fb.req_to_token,
                           fb.req_pool_indices, fb.seq_lens, layer.scaling, workspace=ws)
        return out.reshape(b, layer.num_heads * layer.head_dim)
