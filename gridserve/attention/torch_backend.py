"""Reference attention over the paged KV cache in plain PyTorch (CPU and GPU).

Extend attends request by request (its cached prefix plus its new tokens, causal); decode gathers every
request's KV into one padded batch and runs a single masked SDPA.
"""

import torch
import torch.nn.functional as F

from gridserve.attention.base import AttentionBackend
from gridserve.forward_batch import ForwardBatch


class TorchAttentionBackend(AttentionBackend):
    def __init__(self):
        self.decode_indices: torch.Tensor | None = None
        self.decode_mask: torch.Tensor | None = None

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if not fb.forward_mode.is_decode():
            return
        # (B, Lmax) KV slots per request; padding points at slot 0, which is kept zero, and is masked out.
        max_len = max(fb.seq_lens_cpu)
        cols = torch.arange(max_len, device=fb.seq_lens.device)
        mask = cols[None, :] < fb.seq_lens[:, None]
        idx = fb.req_to_token[fb.req_pool_indices, :max_len].long()
        self.decode_indices = idx.masked_fill(~mask, 0)
        self.decode_mask = mask[:, None, None, :]  # broadcast over heads and the single query

    def extend_attend(self, q, layer, fb: ForwardBatch, out: torch.Tensor | None = None) -> torch.Tensor:
        k_buf, v_buf = fb.kv_cache.get_kv(layer.layer_id)
        q = q.view(-1, layer.num_heads, layer.head_dim)
        out = torch.empty_like(q) if out is None else out.view(-1, layer.num_heads, layer.head_dim)
        starts = fb.extend_start_loc_cpu
        for i in range(fb.batch_size):
            n, seq_len = fb.extend_seq_lens_cpu[i], fb.seq_lens_cpu[i]
            slots = fb.req_to_token[fb.req_pool_indices[i], :seq_len].long()
            qi = q[starts[i] : starts[i] + n].transpose(0, 1)  # (H, n, D)
            ki = k_buf[slots].transpose(0, 1).to(q.dtype)
            vi = v_buf[slots].transpose(0, 1).to(q.dtype)
            # query j sits at absolute position prefix + j and sees keys 0..prefix+j
            prefix = seq_len - n
            mask = torch.ones(n, seq_len, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
            o = F.scaled_dot_product_attention(qi.unsqueeze(0), ki.unsqueeze(0), vi.unsqueeze(0),
                                               attn_mask=mask, scale=layer.scaling, enable_gqa=True)
            out[starts[i] : starts[i] + n] = o.squeeze(0).transpose(0, 1)
        return out.view(-1, layer.num_heads * layer.head_dim)

    def forward_decode(self, q, k, v, layer, fb: ForwardBatch) -> torch.Tensor:
        if k is not None:
            self.store_kv(k, v, layer, fb)
        k_buf, v_buf = fb.kv_cache.get_kv(layer.layer_id)
        b = fb.batch_size
        qb = q.view(b, layer.num_heads, 1, layer.head_dim)
        kb = k_buf[self.decode_indices].permute(0, 2, 1, 3).to(q.dtype)  # (B, Hkv, L, D)
        vb = v_buf[self.decode_indices].permute(0, 2, 1, 3).to(q.dtype)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=self.decode_mask, scale=layer.scaling,
                                           enable_gqa=True)
        return o.reshape(b, layer.num_heads * layer.head_dim)
