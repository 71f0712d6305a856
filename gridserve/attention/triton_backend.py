"""Attention with the project's Triton kernels over the paged KV cache: split-KV decode, extend (prefill with a
cached prefix, causal over the new tokens) and the fused KV store."""

import torch

from gridserve.attention.base import AttentionBackend, QKRotation
from gridserve.forward_batch import ForwardBatch


class TritonAttentionBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(self, num_kv_splits: int | None = None):
        from gridserve.attention.triton_ops import DecodeWorkspace, decode_attention, extend_attention, store_kv
        from gridserve.attention.triton_ops.decode_attention import DecodePrep

        self._decode = decode_attention
        self._extend = extend_attention
        self._store = store_kv
        self.extend_lens = self.extend_start_loc = None
        self.max_extend_len = 0
        self._workspace_cls = DecodeWorkspace
        self._prep_cls = DecodePrep
        self.num_kv_splits = num_kv_splits  # None: chosen per batch size (decode_attention's default)
        self.workspace = None
        # The workspace the CUDA graphs were captured with. They keep its addresses and write to it at every replay,
        # so it must stay allocated when a larger eager batch replaces self.workspace (freed, it was reused by other
        # tensors and the next replay corrupted them: an illegal memory access after batches above
        # --cuda-graph-max-bs). Workspaces only eager batches used may go.
        self._captured = None

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        """The kernels read req_to_token themselves; extend only needs where each request's new tokens are."""
        if fb.forward_mode.is_extend():
            self.extend_lens, self.extend_start_loc = fb.extend_seq_lens, fb.extend_start_loc
            self.max_extend_len = max(fb.extend_seq_lens_cpu)

    def store_kv(self, k, v, layer, fb: ForwardBatch) -> None:
        k_buf, v_buf = fb.kv_cache.get_kv(layer.layer_id)
        self._store(k_buf, v_buf, fb.out_cache_loc, k, v)

    def extend_attend(self, q, layer, fb: ForwardBatch, out: torch.Tensor | None = None) -> torch.Tensor:
        k_buf, v_buf = fb.kv_cache.get_kv(layer.layer_id)
        shape = (-1, layer.num_heads, layer.head_dim)
        out = self._extend(q.view(shape), k_buf, v_buf, fb.req_to_token, fb.req_pool_indices, fb.seq_lens,
                           self.extend_lens, self.extend_start_loc, layer.scaling, self.max_extend_len,
                           out=None if out is None else out.view(shape))
        return out.reshape(-1, layer.num_heads * layer.head_dim)

    def init_cuda_graph_state(self, max_bs: int, num_heads: int, head_dim: int, device: torch.device) -> None:
        self._captured = self._workspace_for(max_bs, num_heads, head_dim, device)

    def _workspace_for(self, batch_size: int, num_heads: int, head_dim: int, device: torch.device):
        ws = self.workspace
        if ws is None or ws.max_bs < batch_size or ws.num_heads != num_heads:
            from gridserve.attention.triton_ops.decode_attention import LONG_KV_SPLITS, MAX_KV_SPLITS

            # at least the room one request's long grid needs, also before (or without) the CUDA graphs
            least = LONG_KV_SPLITS // MAX_KV_SPLITS
            ws = self._workspace_cls.allocate(max(batch_size, least, 2 * (ws.max_bs if ws else 0)), num_heads,
                                              head_dim, device=device)
            self.workspace = ws
        return ws

    def forward_decode(self, q, k, v, layer, fb: ForwardBatch, prep=None) -> torch.Tensor:
        if k is not None:  # None: stored already, by the rotary kernel or by the decode kernel itself (prep)
            self.store_kv(k, v, layer, fb)
        k_buf, v_buf = fb.kv_cache.get_kv(layer.layer_id)
        b = fb.batch_size
        ws = self._workspace_for(b, layer.num_heads, layer.head_dim, q.device)
        out = self._decode(q.view(b, layer.num_heads, layer.head_dim), k_buf, v_buf, fb.req_to_token,
                           fb.req_pool_indices, fb.seq_lens, layer.scaling, self.num_kv_splits, workspace=ws,
                           prep=prep)
        return out.reshape(b, layer.num_heads * layer.head_dim)

    def rotates_in_decode(self, fb: ForwardBatch) -> bool:
        return fb.forward_mode.is_decode()

    def forward_decode_rotating(self, q, k, v, layer, fb: ForwardBatch, rotation: QKRotation) -> torch.Tensor:
        """The decode kernel norms and rotates q and the new k, and stores the new K/V (DecodePrep)."""
        prep = self._prep_cls(k.view(fb.batch_size, layer.num_kv_heads, layer.head_dim), v, fb.out_cache_loc,
                              rotation.positions, rotation.inv_freq, rotation.scaling, rotation.q_weight,
                              rotation.k_weight, rotation.eps)
        return self.forward_decode(q, None, None, layer, fb, prep)
