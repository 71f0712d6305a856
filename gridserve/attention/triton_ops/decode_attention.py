"""Paged decode attention in Triton (split-KV, two stages).

Stage 1, grid (B, num_kv_heads, num_kv_splits): a program owns one KV head of one request and one split of its
KV length. It handles every query head of that KV head's GQA group at once (the group is padded to a power of
two >= 16 so scores come from ``tl.dot``), walks its split in BLOCK_N blocks of KV slots read from
``req_to_token``, loads each K/V row once, and keeps an online softmax (running max and sum in fp32). It writes
the normalised partial output and its log-sum-exp to fp32 scratch; an empty split writes lse = -inf.

Stage 2, grid (B, num_heads): merges the splits of one (request, head) by their LSEs into the output, in the
output's dtype.

The scratch buffers can be allocated once for a maximum batch (``DecodeWorkspace``) and passed on every call,
so a CUDA graph can capture the kernels with static buffers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gridserve.attention.triton_ops.common import check_paged_inputs


# Per-request index tensors are slices of one host-to-device copy, so their 16-byte alignment changes with the
# batch; specialising on it compiled new kernel variants in the middle of a run (seen in bench offline).
@triton.jit(do_not_specialize_on_alignment=["ReqPoolIdx", "SeqLens"])
def _decode_stage1(
    Q, K, V, ReqToToken, ReqPoolIdx, SeqLens, AttnOut, AttnLse,
    sm_scale,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_rt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GROUP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BASE_SPLITS: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SeqLens + b).to(tl.int32)
    req = tl.load(ReqPoolIdx + b).to(tl.int64)
    # BASE_SPLITS splits up to BASE_SPLITS * MIN_SPLIT_LEN keys; beyond, up to NUM_SPLITS of at least
    # MIN_SPLIT_LEN: a short context is not cut into many tiny splits when the grid has room for a long one
    split_len = tl.maximum(tl.cdiv(seq_len, NUM_SPLITS), tl.minimum(MIN_SPLIT_LEN, tl.cdiv(seq_len, BASE_SPLITS)))
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_H)
    mask_h = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V

    q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)

    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        slots = tl.load(ReqToToken + req * stride_rt + offs_n, mask=mask_n, other=0).to(tl.int64)

        k = tl.load(K + slots[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)  # (BLOCK_H, BLOCK_N) fp32
        s = tl.where(mask_n[None, :], s * sm_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every block has at least one valid key
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])

        v = tl.load(V + slots[:, None] * stride_vt + kvh * stride_vh + offs_dv[None, :],
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))

    o_ptrs = (AttnOut + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os
              + offs_dv[None, :])
    if start < end:  # stage 2 reads no output of an empty split
        tl.store(o_ptrs, out, mask=mask_h[:, None] & mask_dv[None, :])
    tl.store(AttnLse + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


@triton.jit
def _decode_stage2(
    AttnOut, AttnLse, Out,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)

    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < NUM_SPLITS
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V

    lse = tl.load(AttnLse + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (seq_len 0, a padded row): output zeros
    w = tl.exp(lse - m)
    w = tl.where(mask_s & (lse > float("-inf")), w, 0.0)
    denom = tl.sum(w, 0)

    parts = tl.load(AttnOut + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_dv[None, :],
                    mask=(w[:, None] > 0.0) & mask_dv[None, :], other=0.0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(Out + b * stride_outb + h * stride_outh + offs_dv, out.to(Out.dtype.element_ty), mask=mask_dv)


MAX_KV_SPLITS = 16  # the most splits a short context is cut into; the workspace holds max_bs x this many
LONG_KV_SPLITS = 64  # the most for a small batch, used only where a split would exceed MIN_SPLIT_LEN keys
MIN_SPLIT_LEN = 256


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_num_kv_splits(batch_size: int, num_kv_heads: int, device: torch.device) -> int:
    """The fewest splits (4, 8 or 16) that give every SM two programs: the KV length is split finely only when
    the batch alone cannot fill the GPU. On an H100 this beat a fixed 8 by 4% at batch 256 and 17% at
    batch 1 (scripts/bench_decode_kernel.py, docs/benchmarks.md). When even 16 leave SMs idle, the grid has
    LONG_KV_SPLITS, which only contexts over 16 x MIN_SPLIT_LEN keys use (the kernel's split length)."""
    for splits in (4, 8, MAX_KV_SPLITS):
        if batch_size * num_kv_heads * splits >= 2 * _sm_count(device):
            return splits
    return LONG_KV_SPLITS


@dataclass
class DecodeWorkspace:
    """fp32 scratch for split-KV decode, room for `max_bs` requests x MAX_KV_SPLITS splits (a smaller batch may use
    more splits in the same room): reuse it across calls / CUDA graphs."""

    attn_out: torch.Tensor  # flat: (request, split) pairs x num_heads x head_dim_v
    attn_lse: torch.Tensor  # flat: pairs x num_heads
    max_bs: int
    num_heads: int
    head_dim_v: int

    @classmethod
    def allocate(cls, max_bs: int, num_heads: int, head_dim_v: int, num_kv_splits: int = MAX_KV_SPLITS,
                 device: str | torch.device = "cuda") -> DecodeWorkspace:
        pairs = max_bs * num_kv_splits
        return cls(attn_out=torch.empty(pairs * num_heads * head_dim_v, dtype=torch.float32, device=device),
                   attn_lse=torch.empty(pairs * num_heads, dtype=torch.float32, device=device),
                   max_bs=max_bs, num_heads=num_heads, head_dim_v=head_dim_v)

    def max_splits(self, batch_size: int) -> int:
        return self.attn_lse.numel() // (self.num_heads * max(1, batch_size))

    def views(self, batch_size: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(attn_out (B, H, S, Dv), attn_lse (B, H, S)) over the start of the buffers."""
        n = batch_size * self.num_heads * splits
        return (self.attn_out[: n * self.head_dim_v].view(batch_size, self.num_heads, splits, self.head_dim_v),
                self.attn_lse[:n].view(batch_size, self.num_heads, splits))


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    num_kv_splits: int | None = None,
    out: torch.Tensor | None = None,
    workspace: DecodeWorkspace | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """One decode query per request attended over its paged KV, ``req_to_token[req_pool_indices[i], :seq_lens[i]]``.

    q: (B, num_heads, head_dim); k_buffer: (num_slots + 1, num_kv_heads, head_dim); v_buffer:
    (num_slots + 1, num_kv_heads, head_dim_v). Returns (B, num_heads, head_dim_v) in q's dtype (written into
    ``out`` when given). The number of splits defaults to ``default_num_kv_splits``, at most the workspace's;
    with ``workspace`` no scratch is allocated. The launch settings were tuned on an H100 (block_n 64, 4 warps,
    2 stages: within 3% of the best of 54 settings from batch 1 to 256, contexts 512 to 2048).
    """
    q, sh = check_paged_inputs(q, k_buffer, v_buffer, req_to_token)
    bs, num_heads, head_dim_v = q.shape[0], sh.num_heads, sh.head_dim_v

    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(bs, sh.num_kv_heads, q.device)
        if workspace is not None:
            num_kv_splits = min(num_kv_splits, workspace.max_splits(bs))
    if workspace is None:
        workspace = DecodeWorkspace.allocate(bs, num_heads, head_dim_v, num_kv_splits, q.device)
    if (workspace.num_heads != num_heads or workspace.head_dim_v != head_dim_v
            or workspace.max_splits(bs) < num_kv_splits):
        raise ValueError(f"workspace of {workspace.max_bs} x {workspace.num_heads} x {workspace.head_dim_v} too small "
                         f"for batch {bs} x {num_heads} x {num_kv_splits} splits x {head_dim_v}")
    attn_out, attn_lse = workspace.views(bs, num_kv_splits)

    if out is None:
        out = torch.empty((bs, num_heads, head_dim_v), dtype=q.dtype, device=q.device)
    elif out.shape != (bs, num_heads, head_dim_v) or out.stride(2) != 1:
        raise ValueError(f"out must be ({bs}, {num_heads}, {head_dim_v}) and contiguous in its last dimension")
    if bs == 0:
        return out

    block_h = max(16, triton.next_power_of_2(sh.group))

    _decode_stage1[(bs, sh.num_kv_heads, num_kv_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, attn_out, attn_lse,
        float(sm_scale),
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        attn_out.stride(0), attn_out.stride(1), attn_out.stride(2),
        attn_lse.stride(0), attn_lse.stride(1),
        GROUP=sh.group, NUM_SPLITS=num_kv_splits, BASE_SPLITS=min(num_kv_splits, MAX_KV_SPLITS),
        MIN_SPLIT_LEN=MIN_SPLIT_LEN, HEAD_DIM=sh.head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_H=block_h, BLOCK_D=sh.block_d, BLOCK_DV=sh.block_dv, BLOCK_N=block_n,
        DOT_PRECISION=sh.dot_precision, DOT_FP32=sh.dot_fp32, num_warps=num_warps, num_stages=num_stages,
    )
    _decode_stage2[(bs, num_heads)](
        attn_out, attn_lse, out,
        attn_out.stride(0), attn_out.stride(1), attn_out.stride(2),
        attn_lse.stride(0), attn_lse.stride(1),
        out.stride(0), out.stride(1),
        NUM_SPLITS=num_kv_splits, HEAD_DIM_V=head_dim_v,
        BLOCK_S=triton.next_power_of_2(num_kv_splits), BLOCK_DV=sh.block_dv,
    )
    return out
