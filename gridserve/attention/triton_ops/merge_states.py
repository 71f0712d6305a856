"""Merging two partial attentions of the same queries over disjoint sets of keys, by their log-sum-exp.

With o_a = softmax(s_a) V_a and lse_a = log(sum(exp(s_a))) for each part, the attention over both is
(o_1 * exp(lse_1 - m) + o_2 * exp(lse_2 - m)) / (exp(lse_1 - m) + exp(lse_2 - m)), m = max(lse_1, lse_2).
One pass over both outputs (read bf16, math in fp32, write once), where the same in PyTorch ops took ~8 passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_fwd(O1, Lse1, O2, Lse2, Out, n_tokens,
               s1_t, s1_h, s2_t, s2_h, l1_h, l1_t, l2_h, l2_t, so_t, so_h,
               HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask_t = t < n_tokens
    mask = mask_t[:, None] & (d[None, :] < HEAD_DIM)
    t64 = t.to(tl.int64)
    lse1 = tl.load(Lse1 + h * l1_h + t64 * l1_t, mask=mask_t, other=0.0)
    lse2 = tl.load(Lse2 + h * l2_h + t64 * l2_t, mask=mask_t, other=0.0)
    m = tl.maximum(lse1, lse2)
    m = tl.where(m == float("-inf"), 0.0, m)  # neither part saw a key: zeros, not NaN
    w1 = tl.exp(lse1 - m)
    w2 = tl.exp(lse2 - m)
    total = w1 + w2
    total = tl.where(total > 0.0, total, 1.0)
    o1 = tl.load(O1 + t64[:, None] * s1_t + h * s1_h + d[None, :], mask=mask, other=0.0).to(tl.float32)
    o2 = tl.load(O2 + t64[:, None] * s2_t + h * s2_h + d[None, :], mask=mask, other=0.0).to(tl.float32)
    out = (o1 * (w1 / total)[:, None] + o2 * (w2 / total)[:, None]).to(Out.dtype.element_ty)
    tl.store(Out + t64[:, None] * so_t + h * so_h + d[None, :], out, mask=mask)


def merge_states(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
    """o1, o2, out: (T, H, D), any strides with D contiguous; lse1, lse2: (H, T) float32, natural log. Writes the
    merged attention into out and returns it."""
    n_tokens, num_heads, head_dim = out.shape
    for o in (o1, o2, out):
        if o.shape != out.shape or o.stride(2) != 1:
            raise ValueError(f"o1, o2 and out must be {tuple(out.shape)} with the last dimension contiguous")
    for lse in (lse1, lse2):
        if lse.shape != (num_heads, n_tokens):
            raise ValueError(f"lse must be ({num_heads}, {n_tokens}); got {tuple(lse.shape)}")
    block_t = 16
    grid = (triton.cdiv(n_tokens, block_t), num_heads)
    _merge_fwd[grid](o1, lse1, o2, lse2, out, n_tokens,
                     o1.stride(0), o1.stride(1), o2.stride(0), o2.stride(1),
                     lse1.stride(0), lse1.stride(1), lse2.stride(0), lse2.stride(1), out.stride(0), out.stride(1),
                     HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
    return out
