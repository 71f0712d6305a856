"""The fused MoE Triton kernels vs the PyTorch reference path (on CPU under TRITON_INTERPRET=1), and the router."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gridserve.layers.fused_moe import fused_moe, sort_by_expert  # noqa: E402
from gridserve.layers.moe import moe_reference, select_experts  # noqa: E402

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
])
def test_fused_moe_equals_the_reference(tokens, experts, top_k, hidden, inter, local):
    x, w13, w2, weights, ids = _case(tokens, experts, top_k, hidden, inter, local)
    want = moe_reference(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    got = fused_moe(x, w13, w2, weights, ids, block_n=32, block_k=32).cpu()
    tol = 1e-4 if DEVICE == "cpu" else 2e-2  # on the GPU tl.dot multiplies float32 in TF32
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_sort_by_expert_groups_every_local_slot_once_in_padded_blocks():
    ids = torch.tensor([[3, 0], [0, -1], [3, 1], [-1, -1], [0, 3]], dtype=torch.int32)
    sorted_ids, expert_of_block = sort_by_expert(ids, num_experts=4, block_m=2)
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
