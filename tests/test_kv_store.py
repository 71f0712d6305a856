"""The fused KV store kernel against indexed assignment, on CPU under TRITON_INTERPRET=1 (on CUDA when run on a
GPU machine without it): strided K/V views, head_dim_v != head_dim, dtype casts, every other slot untouched."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gridserve.attention.triton_ops.kv_store import store_kv  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n,hkv,d,dv,src,cache", [
    (5, 2, 16, 16, torch.float32, torch.float32),
    (1, 1, 24, 8, torch.float32, torch.bfloat16),  # non-power-of-two widths exercise the masks
    (9, 4, 32, 32, torch.bfloat16, torch.bfloat16),
])
def test_matches_indexed_assignment(n, hkv, d, dv, src, cache):
    g = torch.Generator().manual_seed(n)
    slots = 40
    # K and V as the column slices of one QKV projection output, as the model passes them
    qkv = torch.randn(n, 3 * hkv * d + hkv * dv, generator=g).to(src).to(DEVICE)
    k = qkv[:, 2 * hkv * d : 3 * hkv * d]
    v = qkv[:, 3 * hkv * d :]
    loc = (torch.randperm(slots - 1, generator=g)[:n] + 1).to(DEVICE)
    k_cache = torch.full((slots, hkv, d), float("nan"), dtype=cache, device=DEVICE)
    v_cache = torch.full((slots, hkv, dv), float("nan"), dtype=cache, device=DEVICE)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_k[loc] = k.reshape(n, hkv, d).to(cache)
    want_v[loc] = v.reshape(n, hkv, dv).to(cache)
    store_kv(k_cache, v_cache, loc, k, v)
    # a copy is exact; a downcast may round differently (the interpreter truncates to bfloat16)
    tol = dict(rtol=0, atol=0) if src == cache else dict(rtol=8e-3, atol=0)
    torch.testing.assert_close(k_cache, want_k, equal_nan=True, **tol)
    torch.testing.assert_close(v_cache, want_v, equal_nan=True, **tol)


def test_empty_batch_and_shape_errors():
    k_cache = torch.zeros(4, 2, 8, device=DEVICE)
    store_kv(k_cache, k_cache, torch.zeros(0, dtype=torch.int64, device=DEVICE),
             torch.zeros(0, 16, device=DEVICE), torch.zeros(0, 16, device=DEVICE))
    assert not k_cache.any()
    with pytest.raises(ValueError, match="do not fit"):
        store_kv(k_cache, k_cache, torch.ones(2, dtype=torch.int64, device=DEVICE), torch.zeros(2, 12, device=DEVICE),
                 torch.zeros(2, 16, device=DEVICE))
