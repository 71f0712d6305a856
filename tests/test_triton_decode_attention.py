"""Triton paged decode attention vs a plain-PyTorch reference (runs on CPU under TRITON_INTERPRET=1)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gridserve.attention.triton_ops import DecodeWorkspace, decode_attention  # noqa: E402
from tests.paged_kv import make_paged_kv  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"


def reference(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, scale):
    bs, num_heads, _ = q.shape
    group = num_heads // k_buf.shape[1]
    out = torch.empty(bs, num_heads, v_buf.shape[2], dtype=torch.float32)
    for i in range(bs):
        slots = req_to_token[req_pool_indices[i], : seq_lens[i]].long().cpu()
        k = k_buf.cpu()[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)  # (H, L, D)
        v = v_buf.cpu()[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        s = torch.einsum("hd,hld->hl", q[i].cpu().float(), k) * scale
        out[i] = torch.einsum("hl,hld->hd", torch.softmax(s, dim=-1), v)
    return out


def make_case(lens, num_heads, num_kv_heads, head_dim, dtype, seed=0, poison=float("nan"), head_dim_v=None):
    g, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens = make_paged_kv(
        lens, num_kv_heads, head_dim, dtype, seed, poison, head_dim_v)
    q = torch.randn(len(lens), num_heads, head_dim, generator=g).to(dtype)
    to = lambda t: t.to(DEVICE)
    return to(q), to(k_buf), to(v_buf), to(req_to_token), to(req_pool_indices), to(seq_lens)


SHAPES = [
    # (lens, num_heads, num_kv_heads, head_dim)
    ([1], 4, 4, 64),
    ([1, 5, 77], 8, 2, 64),
    ([33, 1, 100, 7, 64], 8, 1, 128),
    ([50, 1, 9], 4, 4, 80),
    ([2, 70, 1], 8, 8, 128),
]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("lens,num_heads,num_kv_heads,head_dim", SHAPES)
def test_matches_reference(lens, num_heads, num_kv_heads, head_dim, dtype, atol):
    q, k, v, r2t, rpi, sl = make_case(lens, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = torch.full((len(lens), num_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    res = decode_attention(q, k, v, r2t, rpi, sl, scale, num_kv_splits=4, out=out)
    assert res is out and res.dtype == dtype
    assert torch.isfinite(out).all(), "output not fully written or poisoned KV leaked"
    ref = reference(q, k, v, r2t, rpi, sl, scale)
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=atol)


@pytest.mark.parametrize("num_kv_splits", [1, 3, 16])
def test_split_counts_and_huge_poison(num_kv_splits):
    # more splits than keys for short requests (empty splits), a split count that is not a power of two
    lens = [1, 3, 40]
    q, k, v, r2t, rpi, sl = make_case(lens, 8, 2, 64, torch.float32, seed=1, poison=1e30)
    out = decode_attention(q, k, v, r2t, rpi, sl, 0.125, num_kv_splits=num_kv_splits, block_n=16)
    ref = reference(q, k, v, r2t, rpi, sl, 0.125)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_a_long_grid_splits_only_long_contexts_finely():
    """64 splits in the grid: a context of up to 16 x MIN_SPLIT_LEN keys still uses at most 16 (the rest are empty
    and skipped), a longer one all 64; a workspace for 4 requests x 16 splits holds 1 request x 64."""
    from gridserve.attention.triton_ops.decode_attention import MIN_SPLIT_LEN

    lens = [3, 300, 16 * MIN_SPLIT_LEN + 700, 64 * MIN_SPLIT_LEN + 100]
    q, k, v, r2t, rpi, sl = make_case(lens, 4, 2, 32, torch.float32, seed=5)
    ws = DecodeWorkspace.allocate(max_bs=4, num_heads=4, head_dim_v=32, device=DEVICE)
    assert ws.max_splits(1) == 64 and ws.max_splits(3) == 21
    ws.attn_out.fill_(float("nan"))
    for i in range(len(lens)):  # one request at a time, as batch 1 runs
        one = slice(i, i + 1)
        out = decode_attention(q[one], k, v, r2t, rpi[one], sl[one], 0.125, num_kv_splits=64, workspace=ws)
        torch.testing.assert_close(out.cpu(), reference(q[one], k, v, r2t, rpi[one], sl[one], 0.125),
                                   atol=1e-4, rtol=1e-4)
        used = torch.isfinite(ws.views(1, 64)[1][0, 0]).sum().item()
        assert used == min(64, -(-lens[i] // max(-(-lens[i] // 64), min(MIN_SPLIT_LEN, -(-lens[i] // 16)))))
    assert used == 64


def test_fp16_and_workspace_reuse():
    ws = DecodeWorkspace.allocate(max_bs=4, num_heads=8, head_dim_v=64, num_kv_splits=4, device=DEVICE)
    for seed, lens in enumerate([[5, 45], [1, 2, 3, 60]]):
        q, k, v, r2t, rpi, sl = make_case(lens, 8, 4, 64, torch.float16, seed=seed)
        ws.attn_out.fill_(float("nan"))
        ws.attn_lse.fill_(float("nan"))
        out = decode_attention(q, k, v, r2t, rpi, sl, 0.125, workspace=ws)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float().cpu(), reference(q, k, v, r2t, rpi, sl, 0.125), atol=2e-2, rtol=2e-2)


def test_value_head_dim_differs_and_zero_length_row():
    # head_dim_v != head_dim; a seq_len 0 row (padded CUDA-graph batch) gives zeros, not NaN
    q, k, v, r2t, rpi, sl = make_case([4, 20], 4, 2, 32, torch.float32, seed=3, head_dim_v=48)
    sl = sl.clone()
    sl[0] = 0
    out = decode_attention(q, k, v, r2t, rpi, sl, 0.2, num_kv_splits=2)
    assert out.shape == (2, 4, 48)
    assert torch.equal(out[0].cpu(), torch.zeros(4, 48))
    torch.testing.assert_close(out[1:].cpu(), reference(q[1:], k, v, r2t, rpi[1:], sl[1:], 0.2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen3-yarn"])
def test_triton_backend_model_logits_equal_torch_backend(kind, tmp_path):
    """The whole model through --attention-backend triton (decode in Triton) equals the torch backend."""
    from tests.logits_script import make_runner, run_script
    from tests.tiny_models import make_tiny_model

    make_tiny_model(kind, tmp_path)
    want = run_script(make_runner(str(tmp_path), device=DEVICE))
    got = run_script(make_runner(str(tmp_path), attention_backend="triton", device=DEVICE))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
