"""The experts of an MoE layer as two grouped GEMMs in Triton (CUDA; CPU tests run it under TRITON_INTERPRET=1).

1. Sort: the (token, k) slots routed to this rank's experts are grouped by expert, each group padded to a
   multiple of BLOCK_M with an invalid slot, in plain torch ops with static sizes (no host sync, so it can be
   captured in a CUDA graph). Each block of BLOCK_M sorted slots belongs to one expert (or to none: skipped).
2. gate/up: per block, x[token] @ w13[e].T for the gate and up halves, then silu(gate) * up, stored per slot.
3. down: per block, that @ w2[e].T, scaled by the slot's routing weight, stored per slot.
4. The k slots of each token are summed (slots routed to other ranks stay zero).
"""

import torch
import triton
import triton.language as tl


def _block_m(num_slots: int, num_experts: int) -> int:
    """Rows per block: small when few slots fall to each expert (decode), larger when many (prefill)."""
    per_expert = num_slots / max(1, num_experts)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def sort_by_expert(local_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted slot ids, expert of each block). Slot s = token * top_k + k; padding and unused tail entries hold
    the invalid slot (tokens * top_k); blocks past the last expert's have expert -1."""
    flat = local_ids.flatten().long()
    num_slots = flat.numel()
    capacity = num_slots + num_experts * (block_m - 1)
    capacity = -(-capacity // block_m) * block_m
    key = torch.where(flat >= 0, flat, num_experts)  # other ranks' slots sort last and are dropped
    # a scatter-add, not bincount: bincount's output size depends on the data, which a CUDA graph cannot hold
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device).scatter_add_(
        0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    first_of_key = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(num_slots, device=flat.device) - first_of_key[sorted_key]
    valid = sorted_key < num_experts
    dest = torch.where(valid, starts[sorted_key.clamp(max=num_experts - 1)] + rank_in_expert, capacity)
    sorted_ids = torch.full((capacity + 1,), num_slots, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    expert_of_block = torch.searchsorted(ends, block_starts, right=True)
    expert_of_block = torch.where(block_starts < ends[-1], expert_of_block, -1).to(torch.int32)
    return sorted_ids[:capacity], expert_of_block


@triton.jit
def _block_slots(sorted_ptr, pid_m, num_slots, BLOCK_M: tl.constexpr):
    """The sorted slot ids of block pid_m, and which of them are real (padding holds num_slots)."""
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    return slots, slots < num_slots


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, out_ptr, sorted_ptr, expert_ptr, num_slots, top_k, hidden, inter,
                    stride_xm, stride_we, stride_wn, stride_om,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        acc_gate = tl.dot(a, wg, acc_gate)
        acc_up = tl.dot(a, wu, acc_up)
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(out_ptr + slots[:, None].to(tl.int64) * stride_om + cols[None, :], act.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(a_ptr, w_ptr, out_ptr, sorted_ptr, expert_ptr, weight_ptr, num_slots, hidden, inter,
                 stride_am, stride_we, stride_wn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(expert_ptr + pid_m)
    if e < 0:
        return
    slots, row_ok = _block_slots(sorted_ptr, pid_m, num_slots, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        a = tl.load(a_ptr + slots[:, None].to(tl.int64) * stride_am + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=col_ok[None, :] & k_ok[:, None],
                    other=0.0)
        acc = tl.dot(a, w, acc)
    scale = tl.load(weight_ptr + slots, mask=row_ok, other=0.0)
    acc = acc * scale[:, None]
    tl.store(out_ptr + slots[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              local_ids: torch.Tensor, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """Same result as layers.moe.moe_reference: x (M, H), w13 (E, 2I, H), w2 (E, H, I), weights and local_ids
    (M, top_k), local_ids -1 for experts on other ranks."""
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
        x, w13, act, sorted_ids, expert_of_block, num_slots, top_k, hidden, inter,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    _down_kernel[(blocks, triton.cdiv(hidden, block_n))](
        act, w2, out, sorted_ids, expert_of_block, weights.flatten().float().contiguous(), num_slots, hidden, inter,
        act.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.view(m, top_k, hidden).sum(dim=1)
