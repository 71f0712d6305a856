"""The (token, k) slots of an MoE layer grouped by expert for the grouped GEMMs (layers/fused_moe.py), in three small
Triton kernels with static sizes (no host sync, so a CUDA graph captures them).

Each expert's group is padded to a whole number of BLOCK_M rows with the invalid slot id (num_slots), and every block
of BLOCK_M sorted slots belongs to one expert (or, past the last group, to none: -1). Slots keep their order within
an expert, as a stable sort would. In PyTorch this took 32 ops that launch work (a stable sort, itself several
kernels; scatters, cumsums, searchsorted, elementwise steps), a few microseconds each inside a decode step's CUDA
graph, in every MoE layer, at every batch too large for the matrix-vector path. The three:
  _count_kernel    (a program per CHUNK slots): how many of its slots each expert has;
  _offsets_kernel  (one program): the exclusive scan of those counts over the chunks (each chunk's first place in each
                   expert's group), where each group starts, the expert of every block, and the padding's invalid ids;
  _scatter_kernel  (a program per CHUNK slots): each slot to its group's start + its chunk's place + the slots of the
                   same expert earlier in its chunk.
"""

import torch
import triton
import triton.language as tl

CHUNK = 128  # slots a program of the count and scatter kernels takes (the scatter compares them pairwise)


@triton.jit
def _chunk_keys(ids_ptr, c, num_slots, num_experts, CHUNK: tl.constexpr):
    """Chunk c's slot numbers, their local expert ids, and which are this rank's (id -1: another rank's expert)."""
    slots = c * CHUNK + tl.arange(0, CHUNK)
    key = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1)
    return slots, key, (key >= 0) & (key < num_experts)


# The slot and block counts change with the batch: one compiled variant for all of them (specialising on a count
# of 1 or on its divisibility by 16 would compile new ones while a server captures its decode graphs)
@triton.jit(do_not_specialize=["num_slots"])
def _count_kernel(ids_ptr, counts_ptr, num_slots, num_experts, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    c = tl.program_id(0)
    _, key, ok = _chunk_keys(ids_ptr, c, num_slots, num_experts, CHUNK)
    es = tl.arange(0, E_PAD)
    hits = (key[:, None] == es[None, :]) & ok[:, None]
    tl.store(counts_ptr + c * E_PAD + es, tl.sum(hits.to(tl.int32), axis=0))


@triton.jit(do_not_specialize=["num_chunks", "num_slots", "capacity"])
def _offsets_kernel(counts_ptr, starts_ptr, expert_ptr, sorted_ptr, num_chunks, num_experts, num_slots, capacity,
                    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, SCAN: tl.constexpr, BLOCKS: tl.constexpr,
                    FILL: tl.constexpr):
    es = tl.arange(0, E_PAD)
    real = es < num_experts
    # counts (chunk, expert) -> the slots of each expert in the chunks before (in place), SCAN chunks at a time
    total = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, num_chunks, SCAN):
        cs = c0 + tl.arange(0, SCAN)
        at = counts_ptr + cs[:, None] * E_PAD + es[None, :]
        ok = (cs < num_chunks)[:, None]
        tile = tl.load(at, mask=ok, other=0)
        tl.store(at, tl.cumsum(tile, axis=0) - tile + total[None, :], mask=ok)
        total += tl.sum(tile, axis=0)
    padded = tl.where(real, (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(starts_ptr + es, starts)
    used = tl.sum(padded, axis=0)
    # a block's expert: how many groups end at or before its first row
    for b0 in range(0, capacity // BLOCK_M, BLOCKS):
        bs = b0 + tl.arange(0, BLOCKS)
        first = bs * BLOCK_M
        e = tl.sum(((ends[None, :] <= first[:, None]) & real[None, :]).to(tl.int32), axis=1)
        tl.store(expert_ptr + bs, tl.where(first < used, e, -1), mask=first < capacity)
    # the invalid id where no slot goes: each group's padding, then everything after the last group
    j = tl.arange(0, BLOCK_M)
    pad = starts[:, None] + total[:, None] + j[None, :]
    tl.store(sorted_ptr + pad, tl.full((E_PAD, BLOCK_M), 0, tl.int32) + num_slots,
             mask=real[:, None] & (j[None, :] < (padded - total)[:, None]))
    for p0 in range(used, capacity, FILL):
        ps = p0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + ps, tl.full((FILL,), 0, tl.int32) + num_slots, mask=ps < capacity)


@triton.jit(do_not_specialize=["num_slots"])
def _scatter_kernel(ids_ptr, counts_ptr, starts_ptr, sorted_ptr, num_slots, num_experts, CHUNK: tl.constexpr,
                    E_PAD: tl.constexpr):
    c = tl.program_id(0)
    slots, key, ok = _chunk_keys(ids_ptr, c, num_slots, num_experts, CHUNK)
    e = tl.where(ok, key, 0)
    base = tl.load(starts_ptr + e) + tl.load(counts_ptr + c * E_PAD + e)
    i = tl.arange(0, CHUNK)
    earlier_same = (key[None, :] == key[:, None]) & (i[None, :] < i[:, None])  # [i, j]: j before i, same expert
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    tl.store(sorted_ptr + base + rank, slots, mask=ok)


def sort_by_expert(local_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted slot ids, expert of each block) for local_ids (tokens, top_k), -1 for other ranks' experts. Slot s =
    token * top_k + k. Every expert's group starts at a multiple of block_m and is padded to one with the invalid
    slot (tokens * top_k), as is the tail after the last group; blocks past the last group have expert -1. The
    sizes depend only on the shapes: tokens * top_k + num_experts * (block_m - 1) rounded up to block_m."""
    flat = local_ids.flatten().to(torch.int32).contiguous()
    num_slots = flat.numel()
    capacity = triton.cdiv(num_slots + num_experts * (block_m - 1), block_m) * block_m
    num_chunks = triton.cdiv(num_slots, CHUNK)
    e_pad = triton.next_power_of_2(num_experts)
    dev = flat.device
    counts = torch.empty(max(num_chunks, 1), e_pad, dtype=torch.int32, device=dev)
    starts = torch.empty(e_pad, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=dev)
    expert_of_block = torch.empty(capacity // block_m, dtype=torch.int32, device=dev)
    if num_chunks:
        _count_kernel[(num_chunks,)](flat, counts, num_slots, num_experts, CHUNK=CHUNK, E_PAD=e_pad)
    _offsets_kernel[(1,)](counts, starts, expert_of_block, sorted_ids, num_chunks, num_experts, num_slots, capacity,
                          BLOCK_M=block_m, E_PAD=e_pad, SCAN=16, BLOCKS=64, FILL=1024, num_warps=8)
    if num_chunks:
        _scatter_kernel[(num_chunks,)](flat, counts, starts, sorted_ids, num_slots, num_experts, CHUNK=CHUNK,
                                       E_PAD=e_pad, num_warps=8)
    return sorted_ids, expert_of_block
