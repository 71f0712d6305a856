"""The experts of an MoE layer as two grouped GEMMs in Triton (CUDA; CPU tests run it under TRITON_INTERPRET=1).

1. Sort: the (token, k) slots routed to this rank's experts are grouped by expert, each group padded to a
   multiple of BLOCK_M with an invalid slot, in three small kernels with static sizes (layers/moe_align.py, which a
   CUDA graph captures). Each block of BLOCK_M sorted slots belongs to one expert (or to none: skipped).
2. gate/up: per block, x[token] @ w13[e].T for the gate and up halves, then silu(gate) * up, stored per slot.
3. down: per block, that @ w2[e].T, scaled by the slot's routing weight, stored per slot.
4. The k slots of each token are summed (slots routed to other ranks stay zero).

Decode batches (a few tokens, so a few slots, each mostly on its own expert) skip the sort: one program per
(slot, row tile) reads its expert's rows straight from the router's ids, a matrix-vector product with no padding
and no sorting kernels, and the down kernel sums a token's k slots itself, so no zeroed output and no sum follow.
From the router's logits (fused_moe_routed, what layers.moe.FusedMoE calls) that gate/up kernel also routes: each
program runs its token's softmax and top-k (the same jitted code as the route kernel) and takes its slot's
expert, which saves the route kernel's launch, a fixed cost per layer at decode. Larger batches route first, as
the sort needs every slot's expert.
"""

import torch
import triton
import triton.language as tl

from gridserve.layers.moe_align import sort_by_expert
from gridserve.pdl import launch_args as pdl_args


@triton.jit
def _route_token(logits_ptr, map_ptr, num_experts, num_chosen, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                 RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr):
    """One token's routing from its row of logits at logits_ptr: softmax over the experts in float32, the top k
    (the lowest id among ties), optionally renormalised, and each chosen expert's local id through map_ptr (-1 for
    another rank's). Returns (weights, local ids), each (K_PAD,), entries from TOP_K on 0 and -1. The one copy of
    the routing math: _route_kernel and the vector gate/up kernel both call it, so they route alike, to the bit.
    num_chosen is TOP_K, or less where only the first experts are wanted (then the weights mean nothing).

    Every gate/up program repeats this before its first weight load, hundreds of them at once, so it is kept
    cheap: each expert gets one int64 key, ordered as the top k wants (probability, then the lower id) and
    carrying its local id, so a choice is one max; and the logits are held ROWS times (ROWS = the program's warps),
    a row per warp, so that the reductions along a row stay inside a warp (shuffles, no barriers)."""
    es = tl.broadcast_to(tl.arange(0, BLOCK_E)[None, :], (ROWS, BLOCK_E))
    ok = es < num_experts
    logits = tl.load(logits_ptr + es, mask=ok, other=-float("inf")).to(tl.float32)
    local_of = tl.load(map_ptr + es, mask=ok, other=-1)  # read now, not after the choice: no second wait
    p = tl.where(ok, tl.exp(logits - tl.max(logits, axis=1)[:, None]), 0.0)
    p = p / tl.sum(p, axis=1)[:, None]
    # a probability's bits order as it does (it is >= 0); then the lower id; then the local id (+ 1 >= 0); 16 bits
    # each for the two ids
    key = ((p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | ((BLOCK_E - 1 - es).to(tl.int64) << 16)
           | (local_of + 1).to(tl.int64))
    key = tl.where(ok, key, -1)  # padding: below every expert, never chosen
    ks = tl.arange(0, K_PAD)[None, :]
    chosen = tl.full((ROWS, K_PAD), -1, dtype=tl.int64)
    for j in range(0, num_chosen):  # TOP_K; fewer where only the first ones are needed (then weights are not)
        best = tl.max(key, axis=1)[:, None]
        chosen = tl.where(ks == j, best, chosen)
        key = tl.where(key == best, -1, key)  # keys are distinct: only the chosen one goes
    chosen = tl.max(chosen, axis=0)  # the rows agree
    k_ok = tl.arange(0, K_PAD) < TOP_K
    chosen_w = tl.where(k_ok, (chosen >> 32).to(tl.int32).to(tl.float32, bitcast=True), 0.0)
    if RENORMALIZE:
        chosen_w = chosen_w / tl.sum(chosen_w, axis=0)
    return chosen_w, tl.where(k_ok, (chosen & 0xFFFF).to(tl.int32) - 1, -1)


@triton.jit
def _route_kernel(logits_ptr, map_ptr, weights_ptr, ids_ptr, num_experts, stride_l, TOP_K: tl.constexpr,
                  K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr,
                  PDL: tl.constexpr):
    """Token program_id(0)'s routing (_route_token), stored as its TOP_K weights and local ids."""
    if PDL:  # programmatic dependent launch (gridserve/pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0)
    chosen_w, local = _route_token(logits_ptr + t.to(tl.int64) * stride_l, map_ptr, num_experts, TOP_K, TOP_K,
                                   K_PAD, RENORMALIZE, BLOCK_E, ROWS)
    ks = tl.arange(0, K_PAD)
    k_ok = ks < TOP_K
    tl.store(weights_ptr + t * TOP_K + ks, chosen_w, mask=k_ok)
    tl.store(ids_ptr + t * TOP_K + ks, local, mask=k_ok)


ROUTE_WARPS = 4  # the route kernel's warps, and so its ROWS


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          local_of_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """layers.moe.select_experts and the global-to-local id map in one kernel: (float32 weights, int32 local ids
    with -1 for other ranks' experts), each (tokens, top_k)."""
    m, num_experts = router_logits.shape
    weights = torch.empty(m, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(m, top_k, dtype=torch.int32, device=router_logits.device)
    if m:
        _route_kernel[(m,)](router_logits, local_of_expert, weights, ids, num_experts, router_logits.stride(0),
                            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
                            BLOCK_E=triton.next_power_of_2(num_experts), ROWS=ROUTE_WARPS, num_warps=ROUTE_WARPS,
                            **pdl_args(router_logits.device))
    return weights, ids


@triton.jit
def _uniform_logits_kernel(x_ptr, out_ptr, row_bytes, num_experts, stride_x, stride_o, TOP_K: tl.constexpr,
                           HASH_BYTES: tl.constexpr, BLOCK_E: tl.constexpr):
    """Token program_id(0)'s row of layers.moe.uniform_router_logits, in one kernel (x_ptr: x's bytes)."""
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, HASH_BYTES)
    head = tl.load(x_ptr + t * stride_x + i, mask=i < row_bytes, other=0).to(tl.int64)
    offset = tl.sum(head * ((2 * i + 1).to(tl.int64) * 2654435761), axis=0) % num_experts
    e = tl.arange(0, BLOCK_E)
    rel = (e - offset + num_experts) % num_experts
    stride = num_experts // TOP_K
    chosen = (rel % stride == 0) & (rel // stride < TOP_K)
    tl.store(out_ptr + t * stride_o + e, tl.where(chosen, 0.0, -1e4).to(out_ptr.dtype.element_ty),
             mask=e < num_experts)


def uniform_logits(x: torch.Tensor, num_experts: int, top_k: int, dtype: torch.dtype,
                   hash_bytes: int) -> torch.Tensor:
    """layers.moe.uniform_router_logits in one kernel (a dozen small ones in PyTorch would perturb the timing they
    are there for)."""
    raw = x.contiguous().view(torch.uint8)
    out = torch.empty(x.shape[0], num_experts, dtype=dtype, device=x.device)
    if x.shape[0]:
        _uniform_logits_kernel[(x.shape[0],)](raw, out, raw.shape[1], num_experts, raw.stride(0), out.stride(0),
                                              TOP_K=top_k, HASH_BYTES=hash_bytes,
                                              BLOCK_E=triton.next_power_of_2(num_experts))
    return out


def _block_m(num_slots: int, num_experts: int) -> int:
    """Rows per block: small when few slots fall to each expert (decode), larger when many (prefill)."""
    per_expert = num_slots / max(1, num_experts)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


@triton.jit
def _widen(w, dtype: tl.constexpr):
    """A weight tile in the activations' dtype (FP8 experts go through float32: the interpreter cannot do it
    directly)."""
    return w.to(tl.float32).to(dtype)


@triton.jit
def _block_slots(sorted_ptr, pid_m, num_slots, BLOCK_M: tl.constexpr):
    """The sorted slot ids of block pid_m, and which of them are real (padding holds num_slots)."""
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    return slots, slots < num_slots


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, out_ptr, sorted_ptr, expert_ptr, num_slots, top_k, hidden, inter,
                    stride_xm, stride_we, stride_wn, stride_se, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr,
                    SWAP: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(expert_ptr + pid_m)
    if e < 0:
        return
    slots, row_ok = _block_slots(sorted_ptr, pid_m, num_slots, BLOCK_M)
    tokens = slots // top_k
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # SWAP's
    up_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        a = tl.load(x_ptr + tokens[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None],
                     other=0.0)
        wu = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None],
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if HAS_SCALE:
            wg, wu = _widen(wg, a.dtype), _widen(wu, a.dtype)
        if SWAP:  # accumulated transposed, turned back once after the loop
            gate_t = tl.dot(tl.trans(wg), tl.trans(a), gate_t)
            up_t = tl.dot(tl.trans(wu), tl.trans(a), up_t)
        else:
            acc_gate = tl.dot(a, wg, acc_gate)
            acc_up = tl.dot(a, wu, acc_up)
    if SWAP:
        acc_gate, acc_up = tl.trans(gate_t), tl.trans(up_t)
    if HAS_SCALE:  # FP8 experts: one scale per (expert, row)
        s_base = s_ptr + e.to(tl.int64) * stride_se
        acc_gate *= tl.load(s_base + cols, mask=col_ok, other=0.0)[None, :]
        acc_up *= tl.load(s_base + inter + cols, mask=col_ok, other=0.0)[None, :]
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(out_ptr + slots[:, None].to(tl.int64) * stride_om + cols[None, :], act.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(a_ptr, w_ptr, s_ptr, out_ptr, sorted_ptr, expert_ptr, weight_ptr, num_slots, hidden, inter,
                 stride_am, stride_we, stride_wn, stride_se, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr,
                 SWAP: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(expert_ptr + pid_m)
    if e < 0:
        return
    slots, row_ok = _block_slots(sorted_ptr, pid_m, num_slots, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # SWAP's
    w_base = w_ptr + e.to(tl.int64) * stride_we
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        a = tl.load(a_ptr + slots[:, None].to(tl.int64) * stride_am + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None],
                    other=0.0)
        if HAS_SCALE:
            w = _widen(w, a.dtype)
        if SWAP:
            acc_t = tl.dot(tl.trans(w), tl.trans(a), acc_t)
        else:
            acc = tl.dot(a, w, acc)
    if SWAP:
        acc = tl.trans(acc_t)
    if HAS_SCALE:
        acc *= tl.load(s_ptr + e.to(tl.int64) * stride_se + cols, mask=col_ok, other=0.0)[None, :]
    scale = tl.load(weight_ptr + slots, mask=row_ok, other=0.0)
    acc = acc * scale[:, None]
    tl.store(out_ptr + slots[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gate_up_vec_kernel(x_ptr, w_ptr, s_ptr, out_ptr, ids_ptr, weights_ptr, logits_ptr, map_ptr, hidden, inter,
                        num_experts, stride_xm, stride_lm, stride_we, stride_wn, stride_se, stride_om,
                        TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr,
                        ROUTE: tl.constexpr, K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
                        ROWS: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    """Slot program_id(0)'s rows [n, n + BLOCK_N) of silu(gate) * up, as a matrix-vector product. Its expert is
    read from ids_ptr, or with ROUTE found here from its token's logits (_route_token, as _route_kernel does: no
    route launch before this kernel); then the programs of row tile 0 store the slot's weight and local id to
    weights_ptr and ids_ptr, which the down kernel, next on the stream, reads."""
    if PDL:  # programmatic dependent launch (gridserve/pdl.py)
        tl.extra.cuda.gdc_wait()
        if PDL == 1:  # pdl.EARLY; LATE triggers after the loads below
            tl.extra.cuda.gdc_launch_dependents()
    slot, pid_n = tl.program_id(0), tl.program_id(1)
    token = slot // TOP_K
    if ROUTE:
        # row tile 0 stores the weight, which needs all k; the others only need the experts up to their slot's
        num_chosen = tl.where(pid_n == 0, TOP_K, slot % TOP_K + 1)
        chosen_w, local = _route_token(logits_ptr + token.to(tl.int64) * stride_lm, map_ptr, num_experts,
                                       num_chosen, TOP_K, K_PAD, RENORMALIZE, BLOCK_E, ROWS)
        mine = tl.arange(0, K_PAD) == slot % TOP_K  # this slot's entry: the others are summed in as zeros
        e = tl.sum(tl.where(mine, local, 0), axis=0)
        if pid_n == 0:
            tl.store(ids_ptr + slot, e)
            tl.store(weights_ptr + slot, tl.sum(tl.where(mine, chosen_w, 0.0), axis=0))
    else:
        e = tl.load(ids_ptr + slot)
    if e < 0:  # another rank's expert: the down kernel skips this slot too
        return
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < inter
    w_gate = w_ptr + e.to(tl.int64) * stride_we + rows[:, None] * stride_wn
    w_up = w_gate + inter * stride_wn
    x_row = x_ptr + token.to(tl.int64) * stride_xm
    acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, hidden, BLOCK_K, num_stages=STAGES):  # STAGES - 1 tiles of loads ahead
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        xv = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        ok = row_ok[:, None] & k_ok[None, :]
        acc_gate += tl.load(w_gate + ks[None, :], mask=ok, other=0.0).to(tl.float32) * xv
        acc_up += tl.load(w_up + ks[None, :], mask=ok, other=0.0).to(tl.float32) * xv
    if PDL == 2:  # pdl.LATE: the next kernel's programs may be scheduled once this one's have loaded
        tl.extra.cuda.gdc_launch_dependents()
    gate, up = tl.sum(acc_gate, axis=1), tl.sum(acc_up, axis=1)
    if HAS_SCALE:
        s_base = s_ptr + e.to(tl.int64) * stride_se
        gate *= tl.load(s_base + rows, mask=row_ok, other=0.0)
        up *= tl.load(s_base + inter + rows, mask=row_ok, other=0.0)
    act = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + slot.to(tl.int64) * stride_om + rows, act.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _down_vec_kernel(a_ptr, w_ptr, s_ptr, out_ptr, ids_ptr, weight_ptr, hidden, inter, stride_am, stride_we,
                     stride_wn, stride_se, stride_om, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr, STAGES: tl.constexpr,
                     PDL: tl.constexpr):
    """Token program_id(0)'s output rows [n, n + BLOCK_N): the sum over its k slots of weight * down(act). Each
    step loads the k experts' rows as one (K_PAD, BLOCK_N, BLOCK_K) tile, so all k loads are in flight together
    (a loop over the slots waited for each expert in turn: 46% of copy bandwidth at batch 1 on an H100)."""
    if PDL:  # programmatic dependent launch (gridserve/pdl.py)
        tl.extra.cuda.gdc_wait()
        if PDL == 1:  # pdl.EARLY; LATE triggers after the loads below
            tl.extra.cuda.gdc_launch_dependents()
    token, pid_n = tl.program_id(0), tl.program_id(1)
    j = tl.arange(0, K_PAD)
    slots = token * TOP_K + j
    e = tl.load(ids_ptr + slots, mask=j < TOP_K, other=-1)  # -1: padding, or another rank's expert
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (e >= 0)[:, None] & (rows < hidden)[None, :]  # (K_PAD, BLOCK_N)
    scale = tl.load(weight_ptr + slots, mask=e >= 0, other=0.0)[:, None]
    e64 = tl.maximum(e, 0).to(tl.int64)
    if HAS_SCALE:  # FP8: the row scales of each expert
        scale = scale * tl.load(s_ptr + e64[:, None] * stride_se + rows[None, :], mask=ok, other=0.0)
    w_rows = w_ptr + e64[:, None, None] * stride_we + rows[None, :, None] * stride_wn
    a_rows = a_ptr + slots.to(tl.int64)[:, None] * stride_am
    acc = tl.zeros((K_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, inter, BLOCK_K, num_stages=STAGES):  # STAGES - 1 tiles of loads ahead
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        av = tl.load(a_rows + ks[None, :], mask=(e >= 0)[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_rows + ks[None, None, :], mask=ok[:, :, None] & k_ok[None, None, :], other=0.0)
        acc += w.to(tl.float32) * av[:, None, :]
    if PDL == 2:  # pdl.LATE: the next kernel's programs may be scheduled once this one's have loaded
        tl.extra.cuda.gdc_launch_dependents()
    out = tl.sum(tl.sum(acc, axis=2) * scale, axis=0)
    tl.store(out_ptr + token.to(tl.int64) * stride_om + rows, out.to(out_ptr.dtype.element_ty), mask=rows < hidden)


# The grouped GEMMs as W a^T (the expert's weight tile as the MMA's long side): a block of 16 slots on the long side
# compiles to Ampere's mma.sync on sm_90, a 64-row weight tile there to Hopper's wgmma (scripts/kernel_resources.py's
# way of looking). On an H100 one layer took 3-11% less at batches 16-256 (docs/benchmarks.md, the seventeenth
# session's lease).
SORTED_SWAP = True
# Up to this many (token, k) slots the matrix-vector path runs; above it, the sorted grouped GEMM.
VEC_MAX_SLOTS = 64
# (BLOCK_N, BLOCK_K, num_warps, stages) of the matrix-vector kernels, gate/up and down: the fastest of a sweep
# (scripts/bench_moe_kernel.py --sweep, Qwen3-30B-A3B layer, batch 1); gate/up on an H100 and again on an H200,
# down (all k experts in one tile) on an H200, where (4, 128, 8) was not among the five fastest. Stages 1: loads
# ahead (`--stages`) were no faster on an H100 (docs/benchmarks.md, 2026-12-07)
VEC_CONFIG = {"gate_up": (8, 128, 8, 1), "down": (8, 256, 4, 1)}


def _scales(w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None, w13: torch.Tensor):
    """(scale pointers, their expert strides, HAS_SCALE) for the kernels; the weights stand in when there are none."""
    if w13_scale is None:
        return w13, w13, 0, 0, False
    return w13_scale.contiguous(), w2_scale.contiguous(), w13_scale.stride(0), w2_scale.stride(0), True


def _moe_vec(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
             config: dict | None, w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None,
             routing: tuple[torch.Tensor, torch.Tensor, bool] | None) -> torch.Tensor:
    """The two matrix-vector kernels. weights (float32) and ids (int32) are contiguous (tokens, top_k); with
    routing = (router logits, local id of each expert, renormalize) the gate/up kernel fills them first."""
    bn_gu, bk_gu, warps_gu, stages_gu = (config or VEC_CONFIG)["gate_up"]
    bn_d, bk_d, warps_d, stages_d = (config or VEC_CONFIG)["down"]
    s13, s2, stride_s13, stride_s2, has_scale = _scales(w13_scale, w2_scale, w13)
    m, hidden = x.shape
    inter, top_k = w2.shape[2], ids.shape[1]
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    logits, local_of_expert, renormalize = routing or (weights, ids, False)  # stand-ins when not routing
    num_experts = logits.shape[1]
    act = torch.empty(m * top_k, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(m, hidden, dtype=x.dtype, device=x.device)
    _gate_up_vec_kernel[(m * top_k, triton.cdiv(inter, bn_gu))](
        x, w13, s13, act, ids, weights, logits, local_of_expert, hidden, inter, num_experts, x.stride(0),
        logits.stride(0), w13.stride(0), w13.stride(1), stride_s13, act.stride(0), TOP_K=top_k, BLOCK_N=bn_gu,
        BLOCK_K=bk_gu, HAS_SCALE=has_scale, ROUTE=routing is not None, K_PAD=triton.next_power_of_2(top_k),
        RENORMALIZE=renormalize, BLOCK_E=triton.next_power_of_2(num_experts), ROWS=warps_gu, STAGES=stages_gu,
        num_warps=warps_gu, **pdl_args(x.device))
    _down_vec_kernel[(m, triton.cdiv(hidden, bn_d))](
        act, w2, s2, out, ids, weights, hidden, inter, act.stride(0), w2.stride(0), w2.stride(1), stride_s2,
        out.stride(0), TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_N=bn_d, BLOCK_K=bk_d,
        HAS_SCALE=has_scale, STAGES=stages_d, num_warps=warps_d, **pdl_args(x.device))
    return out


def fused_moe_vec(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  local_ids: torch.Tensor, config: dict | None = None, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fused_moe for few tokens: matrix-vector products per slot, no sort; same arguments and result."""
    return _moe_vec(x, w13, w2, weights.float().contiguous(), local_ids.to(torch.int32).contiguous(), config,
                    w13_scale, w2_scale, None)


def fused_moe_vec_routed(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         top_k: int, renormalize: bool, local_of_expert: torch.Tensor, config: dict | None = None,
                         w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """route + fused_moe_vec with the routing done inside the gate/up kernel, one launch fewer: (output, and the
    weights and local ids it routed to, as route returns them)."""
    m = x.shape[0]
    weights = torch.empty(m, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(m, top_k, dtype=torch.int32, device=x.device)
    out = _moe_vec(x, w13, w2, weights, ids, config, w13_scale, w2_scale,
                   (router_logits, local_of_expert, renormalize))
    return out, weights, ids


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              local_ids: torch.Tensor, block_n: int = 64, block_k: int = 64, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as layers.moe.moe_reference: x (M, H), w13 (E, 2I, H), w2 (E, H, I), weights and local_ids
    (M, top_k), local_ids -1 for experts on other ranks. FP8 weights come with w13_scale (E, 2I) and w2_scale
    (E, H), one float32 scale per (expert, row). Few slots take fused_moe_vec."""
    if local_ids.numel() <= VEC_MAX_SLOTS:
        return fused_moe_vec(x, w13, w2, weights, local_ids, None, w13_scale, w2_scale)
    return fused_moe_sorted(x, w13, w2, weights, local_ids, block_n, block_k, w13_scale, w2_scale)


def fused_moe_routed(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     top_k: int, renormalize: bool, local_of_expert: torch.Tensor,
                     w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fused_moe from the router's logits (M, num_experts): route(router_logits, top_k, renormalize,
    local_of_expert) then fused_moe, except that few slots route inside fused_moe_vec_routed's gate/up kernel
    (at decode the route kernel's launch is a fixed cost worth saving; larger batches need route's ids to sort)."""
    if x.shape[0] * top_k <= VEC_MAX_SLOTS:
        return fused_moe_vec_routed(x, router_logits, w13, w2, top_k, renormalize, local_of_expert, None,
                                    w13_scale, w2_scale)[0]
    weights, local_ids = route(router_logits, top_k, renormalize, local_of_expert)
    return fused_moe_sorted(x, w13, w2, weights, local_ids, w13_scale=w13_scale, w2_scale=w2_scale)


def fused_moe_sorted(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                     local_ids: torch.Tensor, block_n: int = 64, block_k: int = 64,
                     w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fused_moe as grouped GEMMs over the slots sorted by expert; same arguments and result."""
    s13, s2, stride_s13, stride_s2, has_scale = _scales(w13_scale, w2_scale, w13)
    m, hidden = x.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    top_k = local_ids.shape[1]
    num_slots = m * top_k
    block_m = _block_m(num_slots, num_experts)
    sorted_ids, expert_of_block = sort_by_expert(local_ids, num_experts, block_m)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    act = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    out = torch.zeros(num_slots, hidden, dtype=x.dtype, device=x.device)
    blocks = expert_of_block.numel()
    _gate_up_kernel[(blocks, triton.cdiv(inter, block_n))](
        x, w13, s13, act, sorted_ids, expert_of_block, num_slots, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), stride_s13, act.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_SCALE=has_scale, SWAP=SORTED_SWAP)
    _down_kernel[(blocks, triton.cdiv(hidden, block_n))](
        act, w2, s2, out, sorted_ids, expert_of_block, weights.flatten().float().contiguous(), num_slots, hidden,
        inter, act.stride(0), w2.stride(0), w2.stride(1), stride_s2, out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, HAS_SCALE=has_scale, SWAP=SORTED_SWAP)
    return out.view(m, top_k, hidden).sum(dim=1)
