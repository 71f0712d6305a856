"""Attention with the project's Triton kernels over the paged KV cache: split-KV decode, extend (prefill with a
cached prefix, causal over the new tokens) and the fused KV store. Long extends (a request's 2,048+ new tokens, the
chunks of a long prompt) go through cuDNN's fused attention where it is usable (long_extend.py)."""

import logging

import torch

from gridserve.attention.base import AttentionBackend, QKRotation
from gridserve.attention.long_extend import (
    LONG_EXTEND_FROM,
    attend_long,
    cudnn_usable,
    exact_plan,
    supports,
    use_ragged_plans,
)
from gridserve.forward_batch import ForwardBatch
from gridserve.tensor_utils import to_device

logger = logging.getLogger(__name__)


class TritonAttentionBackend(AttentionBackend):
    supports_cuda_graph = True

    def __init__(self, num_kv_splits: int | None = None, device: torch.device | None = None,
                 cudnn_long_prefill: bool = False, whole_chunk: int = 0):
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
        # requests with this many new tokens or more attend through long_extend.py (0: never)
        self.long_extend_from = LONG_EXTEND_FROM if cudnn_long_prefill and device and cudnn_usable(device) else 0
        if self.long_extend_from:
            use_ragged_plans()
        self.whole_chunk = whole_chunk  # a long prompt's chunk length (the prefill budget): exact cuDNN plans
        # this batch's long requests: (start, length, slots, whether their shape takes exact plans)
        self.long: list[tuple[int, int, torch.Tensor, bool]] = []
        self.rest_lens, self.rest_max = None, 0  # the other requests' extend lengths (long ones zeroed), longest
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
            self.long = []
            if self.long_extend_from and self.max_extend_len >= self.long_extend_from:
                self._plan_long(fb)

    def _plan_long(self, fb: ForwardBatch) -> None:
        """Once a batch: each long request's KV slots, and the lengths the Triton kernel takes for the rest."""
        rest = list(fb.extend_seq_lens_cpu)
        for i, (start, n) in enumerate(zip(fb.extend_start_loc_cpu, fb.extend_seq_lens_cpu, strict=True)):
            if n >= self.long_extend_from:
                row = fb.req_to_token.index_select(0, fb.req_pool_indices[i : i + 1])[0]  # no host sync
                slots = row[: fb.seq_lens_cpu[i]].long()
                self.long.append((start, n, slots, exact_plan(n, fb.seq_lens_cpu[i] - n, self.whole_chunk)))
                rest[i] = 0
        self.rest_max = max(rest)
        self.rest_lens = to_device(rest, torch.int64, fb.seq_lens.device) if self.rest_max else None

    def store_kv(self, k, v, layer, fb: ForwardBatch) -> None:
        k_buf, v_buf = fb.kv_cache.get_kv(layer.layer_id)
        self._store(k_buf, v_buf, fb.out_cache_loc, k, v)

    def extend_attend(self, q, layer, fb: ForwardBatch, out: torch.Tensor | None = None) -> torch.Tensor:
        k_buf, v_buf = fb.kv_cache.get_kv(layer.layer_id)
        shape = (-1, layer.num_heads, layer.head_dim)
        q, out = q.view(shape), None if out is None else out.view(shape)
        if self.long and supports(q, k_buf, v_buf):
            out = self._extend_long(q, k_buf, v_buf, layer, fb, out)
        else:
            out = self._triton_extend(q, k_buf, v_buf, layer, fb, out, self.extend_lens, self.max_extend_len)
        return out.reshape(-1, layer.num_heads * layer.head_dim)

    def _triton_extend(self, q, k_buf, v_buf, layer, fb: ForwardBatch, out: torch.Tensor | None,
                       lens: torch.Tensor, max_len: int) -> torch.Tensor:
        """The Triton extend kernel over the batch's requests with `lens` new tokens each (0: skipped)."""
        return self._extend(q, k_buf, v_buf, fb.req_to_token, fb.req_pool_indices, fb.seq_lens, lens,
                            self.extend_start_loc, layer.scaling, max_len, out=out)

    def _extend_long(self, q, k_buf, v_buf, layer, fb: ForwardBatch, out: torch.Tensor | None) -> torch.Tensor:
        """The long requests one by one through cuDNN, the others in one Triton launch. If cuDNN refuses (a build
        without these kernels), a warning, and the Triton kernel from then on."""
        if out is None:
            out = q.new_empty(q.shape)
        try:
            for start, n, slots, exact in self.long:
                attend_long(q[start : start + n], k_buf, v_buf, slots, layer.scaling, out[start : start + n], exact)
        except RuntimeError as e:
            logger.warning("cuDNN attention failed (%s); long prompts use the Triton kernel from now on", e)
            self.long, self.long_extend_from = [], 0
            return self._triton_extend(q, k_buf, v_buf, layer, fb, out, self.extend_lens, self.max_extend_len)
        if self.rest_max:
            self._triton_extend(q, k_buf, v_buf, layer, fb, out, self.rest_lens, self.rest_max)
        return out

    def long_prefix_bytes(self, context_len: int, prefill_tokens: int, num_heads: int, num_kv_heads: int,
                          head_dim: int, dtype: torch.dtype) -> int:
        """The long path's copy of a request's K/V, and the prefix part's output and log-sum-exp."""
        if not self.long_extend_from:
            return 0
        return (2 * context_len * num_kv_heads + prefill_tokens * num_heads) * head_dim * dtype.itemsize \
            + 2 * prefill_tokens * num_heads * 4

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
