"""The fused MoE Triton kernels vs the PyTorch reference path (on CPU under TRITON_INTERPRET=1), the router, and
the entry point from the router's logits (routing inside the vector path's gate/up kernel)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import gridserve.layers.fused_moe as fused_moe_module  # noqa: E402
from gridserve.layers.fused_moe import (  # noqa: E402
    VEC_MAX_SLOTS,
    fused_moe,
    fused_moe_routed,
    fused_moe_sorted,
    fused_moe_vec,
    fused_moe_vec_routed,
    route,
)
from gridserve.layers.moe import moe_reference, select_experts  # noqa: E402
from gridserve.layers.moe_align import CHUNK, sort_by_expert  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"


def _case(tokens: int, experts: int, top_k: int, hidden: int, inter: int, local: range | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    weights, ids = select_experts(torch.randn(tokens, experts, generator=g), top_k, renormalize=True)
    if local is not None:  # expert parallelism: this rank holds experts `local`, renumbered from 0
        ids = torch.where((ids >= local.start) & (ids < local.stop), ids - local.start, -1)
        w13, w2 = w13[local.start:local.stop], w2[local.start:local.stop]
    return [t.to(DEVICE) for t in (x, w13, w2, weights, ids.to(torch.int32))]


@pytest.mark.parametrize("tokens, experts, top_k, hidden, inter, local", [
    (1, 8, 2, 32, 48, None),  # decode at batch 1: most experts idle
    (5, 8, 2, 32, 48, None),
    (40, 8, 2, 64, 96, None),  # several blocks per expert, dims not multiples of the tiles
    (17, 8, 2, 32, 48, range(4, 8)),  # half the experts on this rank
    (9, 4, 1, 32, 16, None),
    (2, 16, 8, 32, 48, range(0, 8)),  # k = 8 as Qwen3-30B-A3B routes: the down kernel's (8, rows, K) tile
])
@pytest.mark.parametrize("method", ["sorted", "sorted-swap", "vec"])
def test_fused_moe_equals_the_reference(tokens, experts, top_k, hidden, inter, local, method, monkeypatch):
    """sorted-swap: the grouped GEMMs as W a^T (SORTED_SWAP), accumulated transposed."""
    monkeypatch.setattr(fused_moe_module, "SORTED_SWAP", method == "sorted-swap")
    x, w13, w2, weights, ids = _case(tokens, experts, top_k, hidden, inter, local)
    want = moe_reference(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    if method.startswith("sorted"):
        got = fused_moe_sorted(x, w13, w2, weights, ids, block_n=32, block_k=32).cpu()
        tol = 1e-4 if DEVICE == "cpu" else 2e-2  # on the GPU tl.dot multiplies float32 in TF32
    else:  # tiles smaller than the dimensions, and a K tile that overruns them (masks)
        got = fused_moe_vec(x, w13, w2, weights, ids, {"gate_up": (16, 32, 4, 3), "down": (8, 32, 4, 2)}).cpu()
        tol = 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["sorted", "sorted-swap", "vec"])
@pytest.mark.parametrize("tokens, local", [(3, None), (40, range(4, 8))])
def test_fp8_experts_equal_the_reference_on_the_same_fp8_weights(method, tokens, local, monkeypatch):
    from gridserve.layers.quantization import quantize_per_channel

    monkeypatch.setattr(fused_moe_module, "SORTED_SWAP", method == "sorted-swap")
    x, w13, w2, weights, ids = _case(tokens, 8, 2, 64, 96, local)
    (q13, s13), (q2, s2) = (quantize_per_channel(w.cpu().reshape(-1, w.shape[-1])) for w in (w13, w2))
    q13, q2 = q13.view(w13.shape).to(DEVICE), q2.view(w2.shape).to(DEVICE)
    s13, s2 = s13.view(w13.shape[:2]).to(DEVICE), s2.view(w2.shape[:2]).to(DEVICE)
    want = moe_reference(x.cpu(), q13.cpu(), q2.cpu(), weights.cpu(), ids.cpu(), s13.cpu(), s2.cpu())
    if method.startswith("sorted"):
        got = fused_moe_sorted(x, q13, q2, weights, ids, 32, 32, s13, s2)
    else:
        got = fused_moe_vec(x, q13, q2, weights, ids, {"gate_up": (16, 32, 4, 3), "down": (8, 32, 4, 2)}, s13, s2)
    tol = 1e-4 if DEVICE == "cpu" else 2e-2
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
    exact = moe_reference(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    assert (want - exact).norm() / exact.norm() < 0.1  # FP8's own error, small


def test_fused_moe_takes_the_vector_path_for_few_slots_only():
    small = _case(VEC_MAX_SLOTS // 2, 8, 2, 32, 48, None)
    large = _case(VEC_MAX_SLOTS // 2 + 1, 8, 2, 32, 48, None)
    torch.testing.assert_close(fused_moe(*small), fused_moe_vec(*small), rtol=0, atol=0)
    torch.testing.assert_close(fused_moe(*large), fused_moe_sorted(*large), rtol=0, atol=0)


def sort_by_expert_reference(local_ids: torch.Tensor, num_experts: int, block_m: int):
    """The grouping in plain PyTorch (a stable argsort; what fused_moe used before the Triton kernels)."""
    flat = local_ids.flatten().long()
    num_slots = flat.numel()
    capacity = -(-(num_slots + num_experts * (block_m - 1)) // block_m) * block_m
    key = torch.where(flat >= 0, flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    rank_in_expert = torch.arange(num_slots) - (torch.cumsum(counts, 0) - counts)[sorted_key]
    dest = torch.where(sorted_key < num_experts, (ends - padded)[sorted_key.clamp(max=num_experts - 1)]
                       + rank_in_expert, capacity)
    sorted_ids = torch.full((capacity + 1,), num_slots, dtype=torch.int32).scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m)
    expert_of_block = torch.where(block_starts < ends[-1], torch.searchsorted(ends, block_starts, right=True), -1)
    return sorted_ids[:capacity], expert_of_block.to(torch.int32)


@pytest.mark.parametrize("tokens,top_k,experts,block_m,other_ranks", [
    (1, 1, 1, 16, False), (5, 2, 4, 2, True), (64, 8, 128, 16, False), (37, 8, 60, 32, True),
    (300, 2, 8, 64, False), (2 * CHUNK // 3 + 5, 3, 6, 16, True), (33, 4, 128, 64, False)])
def test_sort_by_expert_equals_a_stable_sort_in_torch(tokens, top_k, experts, block_m, other_ranks):
    """The three kernels against the PyTorch grouping, bit for bit: expert counts that are and are not powers of two,
    slots over several chunks (the scan across chunks), each block size, other ranks' slots (-1) dropped, experts with
    no slot, many with more than a block."""
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, top_k), generator=g, dtype=torch.int32)
    if other_ranks:
        ids[torch.rand(tokens, top_k, generator=g) < 0.4] = -1
    want_ids, want_experts = sort_by_expert_reference(ids, experts, block_m)
    got_ids, got_experts = sort_by_expert(ids.to(DEVICE), experts, block_m)
    assert torch.equal(got_ids.cpu(), want_ids)
    assert torch.equal(got_experts.cpu(), want_experts)


def test_sort_by_expert_groups_every_local_slot_once_in_padded_blocks():
    ids = torch.tensor([[3, 0], [0, -1], [3, 1], [-1, -1], [0, 3]], dtype=torch.int32)
    sorted_ids, expert_of_block = sort_by_expert(ids.to(DEVICE), num_experts=4, block_m=2)
    sorted_ids, expert_of_block = sorted_ids.cpu(), expert_of_block.cpu()
    invalid = ids.numel()
    blocks = sorted_ids.view(-1, 2)
    seen = []
    for b, e in enumerate(expert_of_block.tolist()):
        slots = [s for s in blocks[b].tolist() if s != invalid]
        if e < 0:
            assert slots == []
        seen += [(s, e) for s in slots]
    assert sorted(seen) == sorted((s, int(v)) for s, v in enumerate(ids.flatten().tolist()) if v >= 0)


def test_router_softmax_top_k_and_renormalise():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, ids = select_experts(logits, 2, renormalize=False)
    p = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1]] and torch.allclose(w, p[:, :2])
    w, _ = select_experts(logits, 2, renormalize=True)
    assert torch.allclose(w.sum(-1), torch.ones(1)) and torch.allclose(w, p[:, :2] / p[:, :2].sum())


@pytest.mark.parametrize("experts, top_k, renormalize", [(8, 2, True), (60, 4, False), (128, 8, True), (4, 1, False)])
def test_route_equals_select_experts_and_maps_ids_to_this_ranks(experts, top_k, renormalize):
    logits = torch.randn(7, experts, generator=torch.Generator().manual_seed(experts))
    want_w, want_ids = select_experts(logits, top_k, renormalize)
    local_of = torch.full((experts,), -1, dtype=torch.int32)  # this rank holds the upper half
    local_of[experts // 2:] = torch.arange(experts - experts // 2, dtype=torch.int32)
    w, ids = route(logits.to(DEVICE), top_k, renormalize, local_of.to(DEVICE))
    torch.testing.assert_close(w.cpu(), want_w, rtol=1e-5, atol=1e-6)
    assert ids.cpu().tolist() == local_of[want_ids].tolist()
    assert route(logits[:0].to(DEVICE), top_k, renormalize, local_of.to(DEVICE))[0].shape == (0, top_k)


def _routed_case(tokens: int, experts: int, top_k: int, local: range | None, fp8: bool = False, seed: int = 0):
    """(x, logits, w13, w2, local id of each expert, scales) on DEVICE; hidden 32, expert width 48."""
    g = torch.Generator().manual_seed(seed)
    hidden, inter = 32, 48
    x = torch.randn(tokens, hidden, generator=g)
    logits = torch.randn(tokens, experts, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    local = local or range(experts)  # expert parallelism: this rank holds experts `local`, renumbered from 0
    local_of = torch.full((experts,), -1, dtype=torch.int32)
    local_of[local.start:local.stop] = torch.arange(len(local), dtype=torch.int32)
    w13, w2 = w13[local.start:local.stop], w2[local.start:local.stop]
    scales = {}
    if fp8:
        from gridserve.layers.quantization import quantize_per_channel

        (q13, s13), (q2, s2) = (quantize_per_channel(w.reshape(-1, w.shape[-1])) for w in (w13, w2))
        scales = {"w13_scale": s13.view(w13.shape[:2]).to(DEVICE), "w2_scale": s2.view(w2.shape[:2]).to(DEVICE)}
        w13, w2 = q13.view(w13.shape), q2.view(w2.shape)
    return *(t.to(DEVICE) for t in (x, logits, w13, w2, local_of)), scales


@pytest.mark.parametrize("tokens, experts, top_k, renormalize, local, fp8", [
    (1, 8, 2, True, None, False),  # decode: the vector path, routed in its gate/up kernel
    (3, 8, 1, False, None, False),
    (5, 8, 3, False, range(2, 6), False),  # half the experts on another rank: their slots skipped
    (2, 6, 2, True, range(0, 3), True),  # FP8 experts, on the vector path
    (VEC_MAX_SLOTS // 2 + 1, 8, 2, True, range(4, 8), False),  # too many slots: route, then the sorted path
    (VEC_MAX_SLOTS // 2 + 1, 8, 2, False, None, True),
])
def test_fused_moe_routed_equals_select_experts_and_the_reference(tokens, experts, top_k, renormalize, local, fp8):
    x, logits, w13, w2, local_of, scales = _routed_case(tokens, experts, top_k, local, fp8)
    weights, ids = select_experts(logits.cpu(), top_k, renormalize)
    want = moe_reference(x.cpu(), w13.cpu(), w2.cpu(), weights, local_of.cpu()[ids],
                         *(s.cpu() for s in scales.values()))
    got = fused_moe_routed(x, logits, w13, w2, top_k, renormalize, local_of, **scales)
    tol = 1e-4 if DEVICE == "cpu" else 2e-2
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("top_k, renormalize, local", [
    (1, False, None), (2, True, range(3, 8)), (3, False, range(0, 4))])
def test_vector_path_routes_as_route_does_and_writes_its_ids_and_weights(top_k, renormalize, local):
    x, logits, w13, w2, local_of, _ = _routed_case(4, 8, top_k, local)
    logits[1] = torch.tensor([1.0, 3.0, 0.5, 3.0, 3.0, -2.0, 0.0, 1.0])  # ties: the lowest id first
    config = {"gate_up": (16, 32, 4, 3), "down": (8, 32, 4, 2)}
    got, got_w, got_ids = fused_moe_vec_routed(x, logits, w13, w2, top_k, renormalize, local_of, config)
    want_w, want_ids = route(logits, top_k, renormalize, local_of)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)  # to the bit: the same routing code
    assert (got_ids < 0).any() == (local is not None)
    torch.testing.assert_close(got, fused_moe_vec(x, w13, w2, want_w, want_ids, config), rtol=0, atol=0)
    assert fused_moe_routed(x[:0], logits[:0], w13, w2, top_k, renormalize, local_of).shape == (0, x.shape[1])


def test_the_align_kernels_compile_for_hopper():
    """No GPU needed: the three grouping kernels compile for sm_90 with Triton's own ptxas (the interpreter accepts
    code that the compiler rejects). A separate process: this one's kernels may be the interpreter's."""
    import subprocess
    import sys

    script = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gridserve.layers import moe_align as ma
ptr, i32 = "*i32", "i32"
kernels = [
    (ma._count_kernel, dict(ids_ptr=ptr, counts_ptr=ptr, num_slots=i32, num_experts=i32),
     dict(CHUNK=ma.CHUNK, E_PAD=128)),
    (ma._offsets_kernel, dict(counts_ptr=ptr, starts_ptr=ptr, expert_ptr=ptr, sorted_ptr=ptr, num_chunks=i32,
                              num_experts=i32, num_slots=i32, capacity=i32),
     dict(BLOCK_M=64, E_PAD=128, SCAN=16, BLOCKS=64, FILL=1024)),
    (ma._scatter_kernel, dict(ids_ptr=ptr, counts_ptr=ptr, starts_ptr=ptr, sorted_ptr=ptr, num_slots=i32,
                              num_experts=i32), dict(CHUNK=ma.CHUNK, E_PAD=128)),
]
for fn, sig, consts in kernels:
    sig.update(dict.fromkeys(consts, "constexpr"))
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8})
    assert k.asm["cubin"], fn.__name__
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
