"""The fused KV store: one kernel writes the new tokens' K and V rows into the paged cache.

Indexed assignment (`k_cache[loc] = k`, then the same for v) is two gather-scatter kernels of ~3 us each per
layer, 56 launches per decode step on a 28-layer model; this is one launch per layer, and it reads K and V
straight from their strided views of the QKV projection.
"""

import torch
import triton
import triton.language as tl

from gridserve.pdl import launch_args as pdl_args


@triton.jit(do_not_specialize_on_alignment=["Loc"])  # a slice of the batch's one input copy
def _store_kv_kernel(K, V, KCache, VCache, Loc, stride_k, stride_v, stride_kc, stride_vc,
                     K_WIDTH: tl.constexpr, V_WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
                     PDL: tl.constexpr):
    if PDL:  # programmatic dependent launch (gridserve/pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(Loc + i).to(tl.int64)
    ok = tl.arange(0, BLOCK_K)
    mk = ok < K_WIDTH
    k = tl.load(K + i * stride_k + ok, mask=mk)
    tl.store(KCache + slot * stride_kc + ok, k.to(KCache.dtype.element_ty), mask=mk)
    ov = tl.arange(0, BLOCK_V)
    mv = ov < V_WIDTH
    v = tl.load(V + i * stride_v + ov, mask=mv)
    tl.store(VCache + slot * stride_vc + ov, v.to(VCache.dtype.element_ty), mask=mv)


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """x as (n, width) with unit stride along the width (a view when x allows it)."""
    x2 = x.reshape(n, -1)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k_cache[loc] = k and v_cache[loc] = v in one kernel. k_cache: (slots, Hkv, D) and v_cache: (slots, Hkv,
    Dv), contiguous; loc: (N,) integer slots; k: N rows of Hkv*D values, v: N rows of Hkv*Dv (any row stride)."""
    n = loc.shape[0]
    if n == 0:
        return
    k2, v2 = _rows(k, n), _rows(v, n)
    kw, vw = k_cache[0].numel(), v_cache[0].numel()
    if k2.shape[1] != kw or v2.shape[1] != vw or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"K/V rows of {k2.shape[1]}/{v2.shape[1]} values do not fit cache rows of {kw}/{vw}")
    _store_kv_kernel[(n,)](k2, v2, k_cache, v_cache, loc, k2.stride(0), v2.stride(0), kw, vw,
                           K_WIDTH=kw, V_WIDTH=vw, BLOCK_K=triton.next_power_of_2(kw),
                           BLOCK_V=triton.next_power_of_2(vw), **pdl_args(k_cache.device))
