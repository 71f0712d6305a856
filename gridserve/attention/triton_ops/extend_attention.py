"""Paged extend (prefill with a cached prefix) attention in Triton.

The new tokens of every request are concatenated in ``q`` (request i's start at ``extend_start_loc[i]``) and their
K/V are already stored in the paged cache. Query j of request i sits at absolute position ``prefix_i + j``
(``prefix_i = seq_lens[i] - extend_lens[i]``) and attends to KV positions ``0..prefix_i + j``, whose slots are
``req_to_token[req_pool_indices[i], p]``.

One kernel, grid (B, num_heads, cdiv(max_extend_len, BLOCK_M)): a program owns BLOCK_M queries of one head of one
request (a program past its request's extend length exits at once), the last row blocks (the most keys) first.
It walks the KV positions in BLOCK_N blocks up to the causal limit of its last query, with ``tl.dot`` for QK^T and
PV and an online softmax in fp32 (base 2). The blocks all its queries see whole (the prefix, most of it for a long
prompt's later chunks) skip the masks; the last few, across the causal diagonal, are masked. A query head maps to
KV head ``head // (num_heads // num_kv_heads)``; with ``group_heads`` a program takes a KV head's whole group.
head_dim is padded to a power of two >= 16 and masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gridserve.attention.triton_ops.common import check_paged_inputs


@triton.jit
def _attend_block(q, acc, m_i, l_i, start_n, end, pos_m, K, V, ReqToToken, req, kvh, stride_rt, stride_kt,
                  stride_kh, stride_vt, stride_vh, offs_d, mask_d, offs_dv, mask_dv, qk_scale,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One block of BLOCK_N keys into the online softmax (base 2: qk_scale holds log2(e)). MASKED: the block
    holds keys past `end` or past some query's causal limit; the blocks every query sees whole skip the masks."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        mask_n = offs_n < end
        slots = tl.load(ReqToToken + req * stride_rt + offs_n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(K + slots[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    else:
        slots = tl.load(ReqToToken + req * stride_rt + offs_n).to(tl.int64)
        k = tl.load(K + slots[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=mask_d[None, :],
                    other=0.0)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
    if MASKED:
        s = tl.where(mask_n[None, :] & (offs_n[None, :] <= pos_m[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    if MASKED:
        v = tl.load(V + slots[:, None] * stride_vt + kvh * stride_vh + offs_dv[None, :],
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
    else:
        v = tl.load(V + slots[:, None] * stride_vt + kvh * stride_vh + offs_dv[None, :], mask=mask_dv[None, :],
                    other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


# Per-request index tensors are slices of one host-to-device copy, so their 16-byte alignment changes with the
# batch; specialising on it compiled new kernel variants in the middle of a run (seen in bench offline).
@triton.jit(do_not_specialize_on_alignment=["ReqPoolIdx", "SeqLens", "ExtendLens", "ExtendStart"])
def _extend_fwd(
    Q, K, V, Out, ReqToToken, ReqPoolIdx, SeqLens, ExtendLens, ExtendStart,
    sm_scale,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_rt,
    GROUP: tl.constexpr,
    HEADS: tl.constexpr,  # query heads a program takes: 1, or the GQA group (its K/V blocks gathered once for all)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries of each head a program takes: HEADS * BLOCK_M rows in its tiles
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    b = tl.program_id(0)
    # The last row blocks see the most keys (causal): launch them first, so that the light ones fill the tail
    # (blocks launch with the last grid axis slowest; in order, a long prompt's heaviest tiles ran last)
    mblk = tl.num_programs(2) - 1 - tl.program_id(2)

    extend_len = tl.load(ExtendLens + b).to(tl.int32)
    if mblk * BLOCK_M >= extend_len:
        return
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    prefix = seq_len - extend_len
    req = tl.load(ReqPoolIdx + b).to(tl.int64)
    q_start = tl.load(ExtendStart + b).to(tl.int64)
    kvh = tl.program_id(1) * HEADS // GROUP
    tile = tl.arange(0, HEADS * BLOCK_M)  # row r: head h[r], query offs_m[r]
    h = tl.program_id(1) * HEADS + tile // BLOCK_M

    offs_m = mblk * BLOCK_M + tile % BLOCK_M  # query index among the request's new tokens
    mask_m = offs_m < extend_len
    pos_m = prefix + offs_m  # absolute position of each query
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V

    rows = q_start + offs_m.to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([HEADS * BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HEADS * BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([HEADS * BLOCK_M, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 in the softmax

    # keys every query of the block sees (the prefix and the new tokens before the block), whole blocks of them
    # without masks; then up to the causal limit of the block's last valid query, masked
    whole = (prefix + mblk * BLOCK_M) // BLOCK_N * BLOCK_N
    end = prefix + tl.minimum((mblk + 1) * BLOCK_M, extend_len)
    for start_n in range(0, whole, BLOCK_N):
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start_n, end, pos_m, K, V, ReqToToken, req, kvh, stride_rt,
                                      stride_kt, stride_kh, stride_vt, stride_vh, offs_d, mask_d, offs_dv, mask_dv,
                                      qk_scale, BLOCK_N, False, DOT_PRECISION)
    for start_n in range(whole, end, BLOCK_N):
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, start_n, end, pos_m, K, V, ReqToToken, req, kvh, stride_rt,
                                      stride_kt, stride_kh, stride_vt, stride_vh, offs_d, mask_d, offs_dv, mask_dv,
                                      qk_scale, BLOCK_N, True, DOT_PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(Out + rows[:, None] * stride_ot + h[:, None] * stride_oh + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by the longest extend in the batch: short prefills keep small tiles
# (more programs to fill the SMs: a 256-token prompt is 8 row blocks a head); from 2,048 tokens (a chunk of a long
# prompt) there are programs enough for tensor-core-sized tiles, and a program takes a KV head's whole GQA group:
# (256, 64, 8, 3) grouped was the fastest of scripts/bench_extend_kernel.py --sweep on an H100, 388-418 TFLOP/s on
# a 32k prompt's 8k chunks of the 8B shape (the best per-head tile, (128, 64, 4, 3): 344-386).
EXTEND_CONFIGS = ((2047, (32, 32, 4, 1)), (1 << 62, (256, 64, 8, 3)))
GROUP_HEADS_FROM = 2048  # extends this long take a program per GQA group by default


def extend_config(max_extend_len: int) -> tuple[int, int, int, int]:
    return next(cfg for limit, cfg in EXTEND_CONFIGS if max_extend_len <= limit)


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    sm_scale: float,
    max_extend_len: int,
    out: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
    group_heads: bool | None = None,
) -> torch.Tensor:
    """Causal attention of each request's new tokens over its whole paged KV (cached prefix + the new tokens).

    q: (N, num_heads, head_dim), the new tokens of all requests concatenated, request i's at
    ``extend_start_loc[i] : extend_start_loc[i] + extend_lens[i]``; k_buffer: (num_slots + 1, num_kv_heads,
    head_dim) and v_buffer: (num_slots + 1, num_kv_heads, head_dim_v), already holding the new tokens' K/V;
    ``max_extend_len`` >= every ``extend_lens[i]``. Returns (N, num_heads, head_dim_v) in q's dtype (written into
    ``out`` when given); rows of q no request covers are left untouched. ``config``: (BLOCK_M, BLOCK_N, num_warps,
    num_stages), else ``extend_config(max_extend_len)``. group_heads: a program takes the whole GQA group of one KV
    head (when the group is a power of two), BLOCK_M // group queries of each, and gathers each K/V block once for
    them all instead of once per query head; None: for extends of GROUP_HEADS_FROM tokens or more.
    """
    q, sh = check_paged_inputs(q, k_buffer, v_buffer, req_to_token)
    block_m, block_n, warps, stages = config or extend_config(max_extend_len)
    n_tokens, num_heads, head_dim_v = q.shape[0], sh.num_heads, sh.head_dim_v
    if block_m < 16 or block_n < 16:
        raise ValueError("block_m and block_n must be >= 16 (tl.dot)")
    bs = seq_lens.shape[0]

    if out is None:
        out = torch.empty((n_tokens, num_heads, head_dim_v), dtype=q.dtype, device=q.device)
    elif out.shape != (n_tokens, num_heads, head_dim_v) or out.stride(2) != 1:
        raise ValueError(f"out must be ({n_tokens}, {num_heads}, {head_dim_v}) and contiguous in its last dimension")
    if bs == 0 or n_tokens == 0 or max_extend_len <= 0:
        return out

    if group_heads is None:
        group_heads = max_extend_len >= GROUP_HEADS_FROM
    heads = sh.group if group_heads and sh.group & (sh.group - 1) == 0 and sh.group <= block_m // 2 else 1
    block_m //= heads  # queries of each head; the tiles keep block_m rows
    grid = (bs, num_heads // heads, triton.cdiv(max_extend_len, block_m))
    _extend_fwd[grid](
        q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens, extend_lens, extend_start_loc,
        float(sm_scale),
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1),
        req_to_token.stride(0),
        GROUP=sh.group, HEADS=heads, HEAD_DIM=sh.head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=sh.block_d, BLOCK_DV=sh.block_dv,
        DOT_PRECISION=sh.dot_precision, DOT_FP32=sh.dot_fp32, num_warps=warps, num_stages=stages,
    )
    return out
