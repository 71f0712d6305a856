"""Paged decode attention in Triton (split-KV; one kernel, or two).

Stage 1, grid (B, num_kv_heads, num_kv_splits): a program owns one KV head of one request and one split of its
KV length. It handles every query head of that KV head's GQA group at once (the group is padded to a power of
two >= 16 so scores come from ``tl.dot``), walks its split in BLOCK_N blocks of KV slots read from
``req_to_token``, loads each K/V row once, and keeps an online softmax (running max and sum in fp32). It writes
the normalised partial output and its log-sum-exp to fp32 scratch. The grid has splits for a long context; a
short one uses the first few (none shorter than a block), and the programs of the others leave at once.

The merge weighs the splits of one (request, head) by their LSEs into the output, in the output's dtype (no
split with keys, as for a padded row of seq_len 0: zeros). By default stage 1 does it itself: after its stores
every program of a used split adds 1 to a per-(request, KV head) counter in the workspace (an acq_rel atomic at
GPU scope), and the one whose add is the last, merges that KV head's group (reading the partials from L2) and
sets the counter back to 0 for the next call or CUDA-graph replay. This saves the second launch: in a CUDA graph
on an H100, 0.5-1 us of a batch-1 call's 7-20 us, and 2-4% at batch 64 (scripts/bench_decode_kernel.py), in every
layer of a decode step. A request whose keys fill one split (every context of up to ``solo_len`` keys is one)
writes its output from that program, with no scratch and no merge. Stage 2, grid (B, num_heads), runs the same
merge as a kernel of its own (``merge_in_stage1=False``).

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
from gridserve.pdl import launch_args as pdl_args


@triton.jit
def _split_len(seq_len, NUM_SPLITS: tl.constexpr, BASE_SPLITS: tl.constexpr, MIN_SPLIT_LEN: tl.constexpr,
               BLOCK_N: tl.constexpr, SOLO_LEN: tl.constexpr):
    # A context of at most SOLO_LEN keys is one split: its program writes the output itself, with no partials to
    # merge. Longer ones: BASE_SPLITS splits up to BASE_SPLITS * MIN_SPLIT_LEN keys; beyond, up to NUM_SPLITS of at
    # least MIN_SPLIT_LEN: a short context is not cut into many tiny splits when the grid has room for a long one.
    # No split is shorter than a block (BLOCK_N keys) either: a program walks at least one block anyway, and fewer
    # splits leave less to merge and fewer programs to wait for.
    split = tl.maximum(tl.cdiv(seq_len, NUM_SPLITS),
                       tl.minimum(MIN_SPLIT_LEN, tl.maximum(tl.cdiv(seq_len, BASE_SPLITS), BLOCK_N)))
    return tl.where(seq_len <= SOLO_LEN, tl.maximum(seq_len, 1), split)


@triton.jit
def _used_splits(seq_len, NUM_SPLITS: tl.constexpr, BASE_SPLITS: tl.constexpr, MIN_SPLIT_LEN: tl.constexpr,
                 BLOCK_N: tl.constexpr, SOLO_LEN: tl.constexpr):
    """The splits that hold keys: the first n of the grid's NUM_SPLITS (0 for an empty row)."""
    return tl.cdiv(seq_len, _split_len(seq_len, NUM_SPLITS, BASE_SPLITS, MIN_SPLIT_LEN, BLOCK_N, SOLO_LEN))


@triton.jit
def _merge_splits(
    AttnOut, AttnLse, Out,  # pointers at one request
    heads, mask_g,  # the query heads to merge, (BLOCK_G,)
    seq_len,
    stride_oh, stride_os, stride_lh, stride_outh,
    NUM_SPLITS: tl.constexpr,
    BASE_SPLITS: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOLO_LEN: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_G: tl.constexpr,
    CHUNK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CACHE: tl.constexpr,  # the loads' cache modifier
):
    """Weighs the splits of each head by their LSEs. Only the first n splits have keys (stage 1 wrote their
    partial outputs and finite LSEs), so LSEs and partials load together, CHUNK_S splits of every head at a time,
    and the chunks merge as an online softmax does; no split with keys (seq_len 0): zeros."""
    n = _used_splits(seq_len, NUM_SPLITS, BASE_SPLITS, MIN_SPLIT_LEN, BLOCK_N, SOLO_LEN)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, n, CHUNK_S):
        offs_s = s0 + tl.arange(0, CHUNK_S)
        mask = mask_g[:, None] & (offs_s < n)[None, :]
        lse = tl.load(AttnLse + heads[:, None] * stride_lh + offs_s[None, :], mask=mask, other=float("-inf"),
                      cache_modifier=CACHE)  # (BLOCK_G, CHUNK_S)
        parts = tl.load(AttnOut + heads[:, None, None] * stride_oh + offs_s[None, :, None] * stride_os
                        + offs_dv[None, None, :], mask=mask[:, :, None] & mask_dv[None, None, :], other=0.0,
                        cache_modifier=CACHE)  # (BLOCK_G, CHUNK_S, BLOCK_DV)
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a padding head (mask_g false) has no LSE
        w = tl.exp(lse - m_new[:, None])  # masked: exp(-inf) = 0
        alpha = tl.exp(m - m_new)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * parts, 1)
        denom = denom * alpha + tl.sum(w, 1)
        m = m_new
    out = acc / tl.where(denom > 0.0, denom, 1.0)[:, None]
    tl.store(Out + heads[:, None] * stride_outh + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=mask_g[:, None] & mask_dv[None, :])


@triton.jit
def _load_rows(base, rows, mask_r, stride_r, offs_d, mask_d, W, QK_NORM: tl.constexpr, HALF: tl.constexpr):
    """What _norm_rotate reads for rows (heads) of one token: the rows in fp32, each lane's rotation partner
    (d +- HALF), and the norm's weights at d and at the partner (QK_NORM; else ones)."""
    partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    m = mask_r[:, None] & mask_d[None, :]
    row = base + rows[:, None] * stride_r
    x = tl.load(row + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
    xp = tl.load(row + partner[None, :], mask=m, other=0.0).to(tl.float32)
    if QK_NORM:
        w = tl.load(W + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        wp = tl.load(W + partner, mask=mask_d, other=0.0).to(tl.float32)
    else:
        w = tl.full([x.shape[1]], 1.0, tl.float32)
        wp = w
    return x, xp, w, wp


@triton.jit
def _norm_rotate(x, xp, w, wp, dt: tl.constexpr, offs_d, pos, inv_freq, eps, scaling, QK_NORM: tl.constexpr,
                 HALF: tl.constexpr):
    """What _load_rows read: RMSNorm over each head (QK_NORM; rounded to the activations' dtype dt, as the separate
    norm's output is), then the Neox rotary embedding at position pos (inv_freq: each lane's frequency); returns
    them in dt, the values the separate kernels (layers/fused_ops) leave."""
    if QK_NORM:
        inv = tl.rsqrt(tl.sum(x * x, 1) / (2 * HALF) + eps)[:, None]
        x = (x * inv * w[None, :]).to(dt).to(tl.float32)
        xp = (xp * inv * wp[None, :]).to(dt).to(tl.float32)
    f = pos * inv_freq
    sign = tl.where(offs_d < HALF, -1.0, 1.0)
    return (x * (tl.cos(f) * scaling)[None, :] + (sign[None, :] * xp) * (tl.sin(f) * scaling)[None, :]).to(dt)


# Per-request index tensors are slices of one host-to-device copy, so their 16-byte alignment changes with the
# batch; specialising on it compiled new kernel variants in the middle of a run (seen in bench offline).
@triton.jit(do_not_specialize_on_alignment=["ReqPoolIdx", "SeqLens", "Pos", "Loc"])
def _decode_stage1(
    Q, K, V, ReqToToken, ReqPoolIdx, SeqLens, AttnOut, AttnLse, Out, Counters,
    KNew, VNew, Loc, Pos, InvFreq, WQ, WK,  # PREP only: the new token's raw k and v, its slot and position
    sm_scale,
    eps, rope_scaling,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_rt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    stride_cb,
    GROUP: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BASE_SPLITS: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    SOLO_LEN: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    MERGE: tl.constexpr,  # the last program of each (request, KV head) merges its splits: no stage 2
    BLOCK_G: tl.constexpr,
    CHUNK_S: tl.constexpr,
    PREP: tl.constexpr,  # q and the new k arrive raw: norm (QK_NORM) and rotate them, store the new K/V first
    QK_NORM: tl.constexpr,
    HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (gridserve/pdl.py)
        tl.extra.cuda.gdc_wait()
        if PDL == 1:  # pdl.EARLY; LATE triggers after the key loop below
            tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # Everything a program loads before its keys is issued here, before the early return below, which waits for
    # seq_len: the round trips overlap instead of following one another (the request's row, q, and the new key and
    # value, which every program of a KV head loads and only the split that holds their slot stores).
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    req = tl.load(ReqPoolIdx + b).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_H)
    mask_h = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < HEAD_DIM_V
    if PREP:
        pos = tl.load(Pos + b).to(tl.float32)
        slot = tl.load(Loc + b).to(tl.int64)
        inv_freq = tl.load(InvFreq + offs_d % HALF, mask=mask_d, other=0.0)
        q_x, q_xp, q_w, q_wp = _load_rows(Q + b.to(tl.int64) * stride_qb, heads, mask_h, stride_qh, offs_d, mask_d,
                                          WQ, QK_NORM, HALF)
        one = tl.arange(0, 1)
        k_x, k_xp, k_w, k_wp = _load_rows(KNew + b.to(tl.int64) * stride_knt, kvh + one, one < 1, stride_knh, offs_d,
                                          mask_d, WK, QK_NORM, HALF)
        v_new = tl.load(VNew + b.to(tl.int64) * stride_vnt + kvh * stride_vnh + offs_dv, mask=mask_dv)
    else:
        q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0)

    # The grid has splits for the longest context; a shorter one's splits past those with keys leave at once, so
    # the merge waits for fewer arrivals. At least split 0 stays: an empty row (seq_len 0) still merges, to zeros.
    split_len = _split_len(seq_len, NUM_SPLITS, BASE_SPLITS, MIN_SPLIT_LEN, BLOCK_N, SOLO_LEN)
    used = tl.maximum(tl.cdiv(seq_len, split_len), 1)  # _used_splits, at least 1
    if split >= used:
        return
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    if PREP:
        q = _norm_rotate(q_x, q_xp, q_w, q_wp, Q.dtype.element_ty, offs_d, pos, inv_freq, eps, rope_scaling, QK_NORM,
                         HALF)
        # The split that holds the newest key stores it (and its value) first; the barrier makes the stores
        # visible to the whole program before its loop loads that slot back. No other program reads it.
        if seq_len > 0:  # (nested: split_len is 0 for an empty row, and a compiled `and` evaluates both sides)
            if split == (seq_len - 1) // split_len:
                k_new = _norm_rotate(k_x, k_xp, k_w, k_wp, KNew.dtype.element_ty, offs_d, pos, inv_freq, eps,
                                     rope_scaling, QK_NORM, HALF)
                tl.store(K + slot * stride_kt + kvh * stride_kh + offs_d[None, :], k_new.to(K.dtype.element_ty),
                         mask=mask_d[None, :])
                tl.store(V + slot * stride_vt + kvh * stride_vh + offs_dv, v_new.to(V.dtype.element_ty), mask=mask_dv)
                tl.debug_barrier()
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

    if PDL == 2:  # pdl.LATE: the next kernel's programs may be scheduled while the splits store and merge
        tl.extra.cuda.gdc_launch_dependents()
    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    if MERGE:
        if used == 1:  # the only split: its output is the result (zeros for an empty row); no scratch, no merge
            tl.store(Out + b.to(tl.int64) * stride_outb + heads[:, None] * stride_outh + offs_dv[None, :],
                     out.to(Out.dtype.element_ty), mask=mask_h[:, None] & mask_dv[None, :])
            return
    lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))

    o_ptrs = (AttnOut + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + split * stride_os
              + offs_dv[None, :])
    if start < end:  # the merge reads no output of an empty split
        tl.store(o_ptrs, out, mask=mask_h[:, None] & mask_dv[None, :])
    tl.store(AttnLse + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=mask_h)

    if MERGE:
        # Every program still here arrives once; the one that sees `used` - 1 earlier arrivals merges. The barrier
        # makes all threads' stores precede the arrival, which releases them at GPU scope; the arrival's acquire
        # and the L2 (.cg) loads after it make the others' partials visible.
        tl.debug_barrier()
        counter = Counters + b * stride_cb + kvh
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == used - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # no program of this call uses it any more
            g = tl.arange(0, BLOCK_G)  # BLOCK_H pads the group to 16 for tl.dot; the merge needs no padding
            b64 = b.to(tl.int64)
            _merge_splits(AttnOut + b64 * stride_ob, AttnLse + b64 * stride_lb, Out + b64 * stride_outb,
                          kvh * GROUP + g, g < GROUP, seq_len, stride_oh, stride_os, stride_lh,
                          stride_outh, NUM_SPLITS, BASE_SPLITS, MIN_SPLIT_LEN, BLOCK_N, SOLO_LEN, HEAD_DIM_V,
                          BLOCK_G, CHUNK_S, BLOCK_DV, ".cg")


@triton.jit(do_not_specialize_on_alignment=["SeqLens"])
def _decode_stage2(
    AttnOut, AttnLse, Out, SeqLens,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    NUM_SPLITS: tl.constexpr,
    BASE_SPLITS: tl.constexpr,
    MIN_SPLIT_LEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOLO_LEN: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    CHUNK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # programmatic dependent launch (gridserve/pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    _merge_splits(AttnOut + b * stride_ob, AttnLse + b * stride_lb, Out + b * stride_outb,
                  h + tl.arange(0, 1), tl.full([1], True, tl.int1), tl.load(SeqLens + b).to(tl.int32),
                  stride_oh, stride_os, stride_lh, stride_outh, NUM_SPLITS, BASE_SPLITS, MIN_SPLIT_LEN, BLOCK_N,
                  SOLO_LEN, HEAD_DIM_V, 1, CHUNK_S, BLOCK_DV, "")


MAX_KV_SPLITS = 16  # the most splits a short context is cut into; the workspace holds max_bs x this many
LONG_KV_SPLITS = 64  # the most for a small batch, used only where a split would exceed MIN_SPLIT_LEN keys
MIN_SPLIT_LEN = 256
# Contexts of at most this many keys attend in one program per (request, KV head), which writes the output itself: no
# partials and no merge, whose stores, arrival and loads are a chain of round trips in a batch-1 call of a few us.
SOLO_LEN = 0
# (BLOCK_N, num_stages) of stage 1. From 5 requests on: 64-key blocks over 3 stages, 1-9% faster than 2 stages at
# batches 4-256 on an H100, and 128-key blocks 3-50% slower at 512 keys. Up to SMALL_BATCH requests of a 2-byte
# cache with at least SMALL_BATCH_GROUP query heads a KV head: 128-key blocks, 1 stage, which in the models on an
# H100 took Qwen3-30B-A3B's step (a group of 8) 0.03 ms down at batch 1 and 256 keys, 0.13 ms at 2,000 keys and 0.22
# ms at batch 4 and 1,000 keys, and Llama-3.1-8B's (4) 0.01-0.03 ms; Qwen3-0.6B's (2) it took 0.024 ms up at 256
# keys (docs/benchmarks.md, 2026-12-07)
LAUNCH = (64, 3)
SMALL_BATCH = 4
SMALL_BATCH_GROUP = 4
SMALL_BATCH_LAUNCH = (128, 1)


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


def default_launch(batch_size: int, group: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block_n, num_stages) for a decode batch of `group` query heads a KV head (see LAUNCH); float32 keeps
    LAUNCH, whose tiles fit its stages."""
    small = batch_size <= SMALL_BATCH and group >= SMALL_BATCH_GROUP and torch.finfo(dtype).bits <= 16
    return SMALL_BATCH_LAUNCH if small else LAUNCH


@dataclass
class DecodeWorkspace:
    """fp32 scratch for split-KV decode, room for `max_bs` requests x MAX_KV_SPLITS splits (a smaller batch may use
    more splits in the same room), and the one-kernel path's arrival counters, one per (request, KV head), zero
    between calls: reuse it across calls / CUDA graphs, one call at a time (not on two streams at once)."""

    attn_out: torch.Tensor  # flat: (request, split) pairs x num_heads x head_dim_v
    attn_lse: torch.Tensor  # flat: pairs x num_heads
    counters: torch.Tensor  # int32, flat: max_bs x num_kv_heads
    max_bs: int
    num_heads: int
    head_dim_v: int

    @classmethod
    def allocate(cls, max_bs: int, num_heads: int, head_dim_v: int, num_kv_splits: int = MAX_KV_SPLITS,
                 device: str | torch.device = "cuda", num_kv_heads: int | None = None) -> DecodeWorkspace:
        """num_kv_heads defaults to num_heads, the most any model with num_heads query heads has."""
        pairs = max_bs * num_kv_splits
        num_kv_heads = num_kv_heads or num_heads
        return cls(attn_out=torch.empty(pairs * num_heads * head_dim_v, dtype=torch.float32, device=device),
                   attn_lse=torch.empty(pairs * num_heads, dtype=torch.float32, device=device),
                   counters=torch.zeros(max_bs * num_kv_heads, dtype=torch.int32, device=device),
                   max_bs=max_bs, num_heads=num_heads, head_dim_v=head_dim_v)

    @property
    def num_kv_heads(self) -> int:
        return self.counters.numel() // self.max_bs

    def max_splits(self, batch_size: int) -> int:
        return self.attn_lse.numel() // (self.num_heads * max(1, batch_size))

    def views(self, batch_size: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(attn_out (B, H, S, Dv), attn_lse (B, H, S)) over the start of the buffers."""
        n = batch_size * self.num_heads * splits
        return (self.attn_out[: n * self.head_dim_v].view(batch_size, self.num_heads, splits, self.head_dim_v),
                self.attn_lse[:n].view(batch_size, self.num_heads, splits))


@dataclass
class DecodePrep:
    """What the decode kernel does before attending, in place of the rotary (or q/k norm + rotary) kernel and
    the KV store: q arrives raw; the new token's raw k (B, Hk, D) and v (B, Hk, Dv) are normed (when the weights
    are given) and rotated at `positions`, then stored at the `loc` slots, which req_to_token already lists last
    for each request. One kernel fewer per decode layer."""

    k: torch.Tensor
    v: torch.Tensor
    loc: torch.Tensor  # (B,) the new token's KV slot
    positions: torch.Tensor  # (B,)
    inv_freq: torch.Tensor  # (D / 2,) float32
    rope_scaling: float = 1.0
    q_weight: torch.Tensor | None = None  # per-head RMSNorm weights (Qwen3), or None
    k_weight: torch.Tensor | None = None
    eps: float = 1e-6

    def launch_args(self, q: torch.Tensor) -> tuple[tuple, tuple, dict]:
        """_decode_stage1's (pointers, scalars and strides, constexprs) for this prep; q's (B, H, D) fixes the
        shapes."""
        bs, _, d = q.shape
        k, v = self.k.view(bs, -1, d), self.v.view(bs, self.k.numel() // (bs * d), -1)
        if k.stride(-1) != 1 or v.stride(-1) != 1 or self.loc.shape != (bs,) or self.positions.shape != (bs,):
            raise ValueError("prep needs k and v contiguous in their last dimension and one slot and position a row")
        norm = self.q_weight is not None
        w_q, w_k = (self.q_weight, self.k_weight) if norm else (self.inv_freq, self.inv_freq)
        return ((k, v, self.loc, self.positions, self.inv_freq, w_q, w_k),
                (float(self.eps), float(self.rope_scaling), k.stride(0), k.stride(1), v.stride(0), v.stride(1)),
                {"PREP": True, "QK_NORM": norm, "HALF": d // 2})


def _no_prep(q: torch.Tensor) -> tuple[tuple, tuple, dict]:
    """Placeholders for the PREP-only arguments (q stands in for every pointer; the kernel reads none of them)."""
    return (q,) * 7, (0.0, 1.0, 0, 0, 0, 0), {"PREP": False, "QK_NORM": False, "HALF": 1}


def _merge_chunk(heads: int, block_s: int, block_dv: int) -> int:
    """Splits merged at a time: a (heads, splits, head_dim_v) fp32 chunk of at most 8K values, 64 registers a
    thread at 4 warps."""
    return min(block_s, max(1, 8192 // (heads * block_dv)))


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
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    merge_in_stage1: bool = True,
    prep: DecodePrep | None = None,
    solo_len: int = SOLO_LEN,
) -> torch.Tensor:
    """One decode query per request attended over its paged KV, ``req_to_token[req_pool_indices[i], :seq_lens[i]]``.

    q: (B, num_heads, head_dim); k_buffer: (num_slots + 1, num_kv_heads, head_dim); v_buffer:
    (num_slots + 1, num_kv_heads, head_dim_v). Returns (B, num_heads, head_dim_v) in q's dtype (written into
    ``out`` when given). The number of splits defaults to ``default_num_kv_splits``, at most the workspace's;
    with ``workspace`` no scratch is allocated. ``block_n`` and ``num_stages`` default to ``default_launch``'s
    for the batch (4 warps: tuned on an H100).

    ``merge_in_stage1`` (default): one kernel, the last program of each (request, KV head) merges the splits and
    leaves the workspace's counters at zero again; False: a second kernel merges (kept to compare the two).
    ``prep``: q is raw; the kernel norms and rotates it and stores the new token's K/V itself (``DecodePrep``).
    ``solo_len``: a request with at most this many keys is one split, which writes its output with no merge (so
    does any request whose keys fill one split).
    """
    q, sh = check_paged_inputs(q, k_buffer, v_buffer, req_to_token)
    bs, num_heads, head_dim_v = q.shape[0], sh.num_heads, sh.head_dim_v
    launch = default_launch(bs, sh.group, k_buffer.dtype)
    block_n, num_stages = block_n or launch[0], num_stages or launch[1]

    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(bs, sh.num_kv_heads, q.device)
        if workspace is not None:
            num_kv_splits = min(num_kv_splits, workspace.max_splits(bs))
    if workspace is None:
        workspace = DecodeWorkspace.allocate(bs, num_heads, head_dim_v, num_kv_splits, q.device,
                                             num_kv_heads=sh.num_kv_heads)
    if (workspace.num_heads != num_heads or workspace.head_dim_v != head_dim_v
            or workspace.max_splits(bs) < num_kv_splits
            or (merge_in_stage1 and workspace.counters.numel() < bs * sh.num_kv_heads)):
        raise ValueError(f"workspace of {workspace.max_bs} x {workspace.num_heads} x {workspace.head_dim_v} "
                         f"({workspace.num_kv_heads} KV heads) too small for batch {bs} x {num_heads} "
                         f"({sh.num_kv_heads} KV heads) x {num_kv_splits} splits x {head_dim_v}")
    attn_out, attn_lse = workspace.views(bs, num_kv_splits)

    if out is None:
        out = torch.empty((bs, num_heads, head_dim_v), dtype=q.dtype, device=q.device)
    elif out.shape != (bs, num_heads, head_dim_v) or out.stride(2) != 1:
        raise ValueError(f"out must be ({bs}, {num_heads}, {head_dim_v}) and contiguous in its last dimension")
    if bs == 0:
        return out

    block_h = max(16, triton.next_power_of_2(sh.group))
    block_s = triton.next_power_of_2(num_kv_splits)
    block_g = triton.next_power_of_2(sh.group)

    prep_ptrs, prep_scalars, prep_consts = _no_prep(q) if prep is None else prep.launch_args(q)
    _decode_stage1[(bs, sh.num_kv_heads, num_kv_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, attn_out, attn_lse, out,
        workspace.counters, *prep_ptrs, float(sm_scale), *prep_scalars,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        attn_out.stride(0), attn_out.stride(1), attn_out.stride(2),
        attn_lse.stride(0), attn_lse.stride(1),
        out.stride(0), out.stride(1),
        sh.num_kv_heads,
        GROUP=sh.group, NUM_SPLITS=num_kv_splits, BASE_SPLITS=min(num_kv_splits, MAX_KV_SPLITS),
        MIN_SPLIT_LEN=MIN_SPLIT_LEN, SOLO_LEN=solo_len, HEAD_DIM=sh.head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_H=block_h, BLOCK_D=sh.block_d, BLOCK_DV=sh.block_dv, BLOCK_N=block_n,
        DOT_PRECISION=sh.dot_precision, DOT_FP32=sh.dot_fp32,
        MERGE=merge_in_stage1, BLOCK_G=block_g, CHUNK_S=_merge_chunk(block_g, block_s, sh.block_dv),
        **prep_consts, num_warps=num_warps, num_stages=num_stages, **pdl_args(q.device),
    )
    if merge_in_stage1:
        return out
    _decode_stage2[(bs, num_heads)](
        attn_out, attn_lse, out, seq_lens,
        attn_out.stride(0), attn_out.stride(1), attn_out.stride(2),
        attn_lse.stride(0), attn_lse.stride(1),
        out.stride(0), out.stride(1),
        NUM_SPLITS=num_kv_splits, BASE_SPLITS=min(num_kv_splits, MAX_KV_SPLITS), MIN_SPLIT_LEN=MIN_SPLIT_LEN,
        BLOCK_N=block_n, SOLO_LEN=solo_len, HEAD_DIM_V=head_dim_v, CHUNK_S=_merge_chunk(1, block_s, sh.block_dv),
        BLOCK_DV=sh.block_dv,
        **pdl_args(q.device),
    )
    return out
