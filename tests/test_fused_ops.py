"""The fused Triton kernels (RMSNorm + residual, rotary, SiLU-and-mul, FP8 per-token quantization) against the
layers' PyTorch code, on CPU under TRITON_INTERPRET=1 (on a GPU machine without it, on CUDA)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gridserve.layers import activation  # noqa: E402
from gridserve.layers.fused_ops import (  # noqa: E402
    per_token_quant_fp8,
    qk_norm_rope_,
    rms_norm,
    rotary_embedding_,
    silu_and_mul,
)
from gridserve.layers.norm import RMSNorm  # noqa: E402
from gridserve.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def rand(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,n", [(1, 64), (5, 24), (3, 130)])  # non-powers of two exercise the masks
def test_rms_norm_with_and_without_residual(dtype, tokens, n):
    norm = RMSNorm(n, eps=1e-6)
    norm.weight.data = torch.rand(n) + 0.5
    x, res = rand(tokens, n, dtype=dtype), rand(tokens, n, dtype=dtype)
    w = norm.weight.to(dtype).to(DEVICE)
    ref_norm = norm.to(dtype)
    want = ref_norm(x.cpu())
    torch.testing.assert_close(rms_norm(x, w, 1e-6).cpu(), want, **TOL[dtype])
    want_y, want_sum = ref_norm(x.cpu(), res.cpu())
    y, s = rms_norm(x, w, 1e-6, res)
    torch.testing.assert_close(s.cpu(), want_sum, **TOL[dtype])
    torch.testing.assert_close(y.cpu(), want_y, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_on_a_strided_view(dtype):
    """q/k norm: (tokens, heads, head_dim) slices of the fused qkv output, not contiguous."""
    tokens, hq, hk, d = 4, 4, 2, 32
    qkv = rand(tokens, (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[:, : hq * d].reshape(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].reshape(tokens, hk, d)
    assert not q.is_contiguous()
    norm = RMSNorm(d, eps=1e-6).to(dtype)
    norm.weight.data = (torch.rand(d) + 0.5).to(dtype)
    w = norm.weight.to(DEVICE)
    for t in (q, k):
        torch.testing.assert_close(rms_norm(t, w, 1e-6).cpu(), norm(t.cpu().contiguous()), **TOL[dtype])


# heads: one block of 16 (padded), or two with q and k heads in the first and padding in the second
HEADS = [(4, 2), (14, 6)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", [None, {"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 256}])
@pytest.mark.parametrize("hq,hk", HEADS)
def test_rotary_in_place_matches_reference(dtype, scaling, hq, hk):
    tokens, d = 6, 64
    rope = RotaryEmbedding(d, 10000.0, 1024, scaling)
    qkv = rand(tokens, (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[:, : hq * d].reshape(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].reshape(tokens, hk, d)
    v_before = qkv[:, (hq + hk) * d :].clone()
    positions = torch.tensor([0, 1, 7, 100, 511, 1000], device=DEVICE)
    want_q, want_k = rope(positions.cpu(), q.cpu().contiguous(), k.cpu().contiguous())
    got_q, got_k = rotary_embedding_(positions, q, k, rope.inv_freq.to(DEVICE), rope.attention_scaling)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    torch.testing.assert_close(got_q.cpu(), want_q, **TOL[dtype])
    torch.testing.assert_close(got_k.cpu(), want_k, **TOL[dtype])
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)  # v, beside q and k in the same buffer, untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hk", HEADS)
def test_qk_norm_then_rotary_in_place_matches_the_separate_layers(dtype, d, hq, hk):
    tokens = 5
    rope = RotaryEmbedding(d, 1000000.0, 4096, None)
    q_norm, k_norm = RMSNorm(d, eps=1e-6), RMSNorm(d, eps=1e-6)
    q_norm.weight.data.uniform_(0.5, 1.5)
    k_norm.weight.data.uniform_(0.5, 1.5)
    qkv = rand(tokens, (hq + 2 * hk) * d, dtype=dtype) * 3
    q = qkv[:, : hq * d].reshape(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].reshape(tokens, hk, d)
    v_before = qkv[:, (hq + hk) * d :].clone()
    positions = torch.tensor([0, 3, 64, 777, 4000], device=DEVICE)
    cpu = [m.to(dtype) for m in (q_norm, k_norm)]
    want_q, want_k = rope(positions.cpu(), cpu[0](q.cpu().contiguous()), cpu[1](k.cpu().contiguous()))
    got_q, got_k = qk_norm_rope_(positions, q, k, q_norm.weight.to(DEVICE, dtype), k_norm.weight.to(DEVICE, dtype),
                                 1e-6, rope.inv_freq.to(DEVICE), rope.attention_scaling)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    torch.testing.assert_close(got_q.cpu(), want_q, **TOL[dtype])
    torch.testing.assert_close(got_k.cpu(), want_k, **TOL[dtype])
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("hq,hk", HEADS)
def test_rotary_also_stores_k_and_v_into_the_paged_cache(dtype, qk_norm, hq, hk):
    """Decode's fused KV store: the rotated k and the v rows land at their slots, exactly what the unfused
    kernels (rotary, then store_kv) write; q and k come out the same, other slots stay untouched."""
    from gridserve.attention.triton_ops import store_kv

    tokens, d, slots = 5, 64, 32
    rope = RotaryEmbedding(d, 10000.0, 4096, None)
    norm_w = [rand(d, dtype=dtype) + 1 for _ in range(2)]
    positions = torch.tensor([0, 3, 64, 777, 4000], device=DEVICE)
    loc = torch.tensor([9, 2, 30, 17, 4], device=DEVICE)
    qkv = rand(tokens, (hq + 2 * hk) * d, dtype=dtype)
    results = []
    for fused in (False, True):
        buf = qkv.clone()
        q = buf[:, : hq * d].reshape(tokens, hq, d)
        k = buf[:, hq * d : (hq + hk) * d].reshape(tokens, hk, d)
        v = buf[:, (hq + hk) * d :]
        caches = [torch.full((slots, hk, d), 7.0, dtype=dtype, device=DEVICE) for _ in range(2)]
        kv = (*caches, loc, v) if fused else None
        if qk_norm:
            qk_norm_rope_(positions, q, k, *norm_w, 1e-6, rope.inv_freq.to(DEVICE), 1.0, kv_cache=kv)
        else:
            rotary_embedding_(positions, q, k, rope.inv_freq.to(DEVICE), 1.0, kv_cache=kv)
        if not fused:
            store_kv(*caches, loc, k.reshape(tokens, -1), v)
        results.append((buf, *caches))
    for unfused, fused in zip(*results, strict=True):
        assert torch.equal(unfused, fused)
    with pytest.raises(ValueError, match="kv_cache needs"):
        rotary_embedding_(positions, q, k, rope.inv_freq.to(DEVICE), 1.0, kv_cache=(*caches, loc[:2], v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 64), (3, 96), (2, 1500)])  # 1500 spans two column blocks
def test_silu_and_mul(dtype, tokens, inter):
    x = rand(tokens, 2 * inter, dtype=dtype)
    torch.testing.assert_close(silu_and_mul(x).cpu(), activation.silu_and_mul(x.cpu()), **TOL[dtype])


def test_empty_batches():
    x = rand(0, 16, dtype=torch.float32)
    assert rms_norm(x, torch.ones(16, device=DEVICE), 1e-6).shape == (0, 16)
    assert silu_and_mul(rand(0, 32, dtype=torch.float32)).shape == (0, 16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,n", [(1, 64), (4, 300), (2, 5000)])  # one block, a masked one, several
def test_per_token_quant_fp8(dtype, tokens, n):
    x = rand(tokens, n, dtype=dtype)
    x[0] = 0  # no division by zero
    q, scale = per_token_quant_fp8(x)
    want_scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448
    torch.testing.assert_close(scale, want_scale, rtol=0, atol=0)
    want = (x.float() / want_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    if DEVICE == "cpu":  # the interpreter rounds ties away from zero, and drops a carry into the exponent (127.9
        want, q = want.float(), q.float()  # -> 64): one step of FP8 apart, or half
        step = torch.exp2(torch.frexp(want)[1].float() - 4).clamp(min=2.0**-9)
        assert (((q - want).abs() <= step) | (q == want / 2)).all()
    else:
        assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
