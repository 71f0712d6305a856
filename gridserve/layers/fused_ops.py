"""Triton kernels that fuse the elementwise work around the matmuls: RMSNorm (with the residual add), rotary
embedding (alone, or after Qwen3's per-head q/k norms; in decode it also stores K/V into the paged cache),
SiLU-and-mul and FP8 per-token quantization. The decode GEMM, which can fold the norm or the SiLU-and-mul into
its input, is in decode_gemm.py.

Written in plain PyTorch these are 5-20 kernels each; a decode step of a 28-layer model launched ~2,000
kernels of 1-2 us, which cost more than its matmuls (profile in docs/benchmarks.md). Each function here is one
kernel. The layers call them for CUDA tensors and keep the PyTorch code as the reference (CPU, tests); the
kernels also run on CPU under TRITON_INTERPRET=1, which is how CI checks them.
"""

import torch
import triton
import triton.language as tl

from gridserve.layers.quantization import FP8, FP8_MAX, MIN_AMAX
from gridserve.pdl import launch_args as pdl_args


@triton.jit
def _rmsnorm_kernel(X, R, W, Y, RO, stride_xt, stride_xh, stride_r, stride_y, stride_ro, H, N, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # programmatic dependent launch (gridserve/pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)  # one row = one (token, head); heads = 1 for hidden-size norms
    t, h = row // H, row % H
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + t * stride_xt + h * stride_xh + cols, mask=mask, other=0.0)
    if HAS_RES:
        # round the sum to the activation dtype first, as the unfused `x + residual` does
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(RO.dtype.element_ty)
        tl.store(RO + row * stride_ro + cols, x, mask=mask)
    x = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * inv * w).to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim of x (..., N); x may be a strided (tokens, heads, N) view. With residual,
    returns (norm(x + residual), x + residual), else norm(x)."""
    n = x.shape[-1]
    x3 = x.reshape(-1, 1, n) if x.dim() == 2 else x
    if x3.dim() != 3 or x3.stride(-1) != 1:
        x3 = x.reshape(-1, 1, n).contiguous()
    tokens, heads = x3.shape[0], x3.shape[1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = r = None
    if residual is not None:
        r = residual.reshape(-1, n)
        if r.stride(-1) != 1 or r.stride(0) != n:
            r = r.contiguous()
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows = tokens * heads
    if rows:
        _rmsnorm_kernel[(rows,)](
            x3, r if r is not None else x3, weight, y, res_out if res_out is not None else y,
            x3.stride(0), x3.stride(1), n, n, n, heads, n, eps,
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), **pdl_args(x.device))
    return y if residual is None else (y, res_out)


@triton.jit(do_not_specialize_on_alignment=["Pos", "Loc"])  # slices of the batch's one input copy
def _rope_kernel(Q, K, Pos, InvFreq, WQ, WK, V, KC, VC, Loc, stride_qt, stride_qh, stride_kt, stride_kh,
                 stride_vt, stride_c, HQ, H, scaling, eps, HALF: tl.constexpr, BLOCK: tl.constexpr,
                 BLOCK_H: tl.constexpr, NORM: tl.constexpr, STORE_KV: tl.constexpr, PDL: tl.constexpr):
    """BLOCK_H heads of one token (q heads 0..HQ-1, then k heads up to H), in place: with NORM first an RMSNorm over
    each head with q's or k's weight (rounded to the activation dtype, as the separate norm's output is), then the
    Neox rotary embedding; a k head (and its v) also to the paged cache if STORE_KV. The token's cos and sin are
    computed once for all its heads (one program per (token, head) recomputed them for each, and 200k programs of
    64 elements ran at a fifth of the copy bandwidth)."""
    if PDL:  # programmatic dependent launch (gridserve/pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK)
    is_q = hs < HQ
    kh = tl.maximum(hs - HQ, 0)
    base = tl.where(is_q, Q + t * stride_qt + hs * stride_qh, K + t * stride_kt + kh * stride_kh)[:, None] \
        + offs[None, :]
    mask = (hs < H)[:, None] & (offs < HALF)[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    dt = Q.dtype.element_ty
    if NORM:
        inv = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        w = tl.where(is_q[:, None], WQ + offs[None, :], WK + offs[None, :])
        x1 = (x1 * inv * tl.load(w, mask=mask, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        x2 = (x2 * inv * tl.load(w + HALF, mask=mask, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
    f = tl.load(Pos + t).to(tl.float32) * tl.load(InvFreq + offs, mask=offs < HALF, other=0.0)
    cos = (tl.cos(f) * scaling)[None, :]
    sin = (tl.sin(f) * scaling)[None, :]
    y1 = (x1 * cos - x2 * sin).to(dt)
    y2 = (x2 * cos + x1 * sin).to(dt)
    tl.store(base, y1, mask=mask)
    tl.store(base + HALF, y2, mask=mask)
    if STORE_KV:
        k_ok = mask & (hs >= HQ)[:, None]
        head = (kh * 2 * HALF)[:, None] + offs[None, :]
        row = tl.load(Loc + t).to(tl.int64) * stride_c + head
        tl.store(KC + row, y1.to(KC.dtype.element_ty), mask=k_ok)
        tl.store(KC + row + HALF, y2.to(KC.dtype.element_ty), mask=k_ok)
        v_row = V + t * stride_vt + head
        tl.store(VC + row, tl.load(v_row, mask=k_ok).to(VC.dtype.element_ty), mask=k_ok)
        tl.store(VC + row + HALF, tl.load(v_row + HALF, mask=k_ok).to(VC.dtype.element_ty), mask=k_ok)


def _rope(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
          kv_cache: tuple | None, norm: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    n, hq, d = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k must be contiguous in their last dimension")
    if n:
        v, kc, vc, loc, stride_vt, stride_c, store = _cache_args(k, kv_cache)
        q_weight, k_weight, eps = norm or (q, q, 0.0)
        h = hq + k.shape[1]
        block_h = min(16, triton.next_power_of_2(h))
        _rope_kernel[(n, triton.cdiv(h, block_h))](
            q, k, positions, inv_freq, q_weight, k_weight, v, kc, vc, loc, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), stride_vt, stride_c, hq, h, float(scaling), eps, HALF=d // 2,
            BLOCK=triton.next_power_of_2(d // 2), BLOCK_H=block_h, NORM=norm is not None, STORE_KV=store,
            **pdl_args(q.device))
    return q, k


def _cache_args(k: torch.Tensor, kv_cache: tuple | None) -> tuple:
    """The kernels' (V, KC, VC, Loc, stride_vt, stride_c, STORE_KV) for an optional (k_cache, v_cache, loc, v)."""
    if kv_cache is None:
        return k, k, k, k, 0, 0, False
    k_cache, v_cache, loc, v = kv_cache
    n, hk, d = k.shape
    v2 = v.reshape(n, hk * d) if v.dim() == 3 else v
    if (k_cache.shape != v_cache.shape or tuple(k_cache.shape[1:]) != (hk, d) or not k_cache.is_contiguous()
            or not v_cache.is_contiguous() or v2.shape != (n, hk * d) or v2.stride(-1) != 1 or loc.shape != (n,)):
        raise ValueError("kv_cache needs contiguous (slots, Hk, D) caches, (N,) slots and v of N rows of Hk*D")
    return v2, k_cache, v_cache, loc, v2.stride(0), k_cache.stride(0), True


def rotary_embedding_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor,
                      scaling: float, kv_cache: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding applied in place to q (N, Hq, D) and k (N, Hk, D); returns them. With
    kv_cache = (k_cache, v_cache, loc, v), the same kernel also writes the rotated k and v (N rows of Hk*D) into
    the paged cache at slots loc: the KV store's own kernel is saved."""
    return _rope(positions, q, k, inv_freq, scaling, kv_cache, None)


def qk_norm_rope_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                  k_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor, scaling: float,
                  kv_cache: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q (N, Hq, D) and k (N, Hk, D) with their own weights, then the Neox rotary embedding,
    in place in one kernel (three otherwise: Qwen3's q/k norms and the rotation); returns q and k. kv_cache as
    in rotary_embedding_: the KV store in the same kernel."""
    return _rope(positions, q, k, inv_freq, scaling, kv_cache, (q_weight, k_weight, eps))


@triton.jit
def _silu_and_mul_kernel(X, Y, stride_x, stride_y, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # programmatic dependent launch (gridserve/pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(X + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + t * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    # silu rounds to the activation dtype before the product, as F.silu(gate) * up does
    act = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + t * stride_y + cols, (act * up).to(Y.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim (tokens, 2I); returns silu(gate) * up (tokens, I)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[1] // 2
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, y, x2.stride(0), y.stride(0), n,
                                                                   BLOCK=block, **pdl_args(x.device))
    return y.view(*x.shape[:-1], n)


@triton.jit
def _per_token_quant_kernel(X, Q, S, stride_x, stride_q, N, fp8_max, min_amax, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Row program_id(0): amax over the row, scale = amax / fp8_max, q = x / scale in FP8 (two passes over the
    row; the second reads it from L2)."""
    if PDL:  # programmatic dependent launch (gridserve/pdl.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, N, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(X + t * stride_x + cols, mask=cols < N, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), min_amax) / fp8_max
    tl.store(S + t, scale)
    for c0 in range(0, N, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(X + t * stride_x + cols, mask=cols < N, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -fp8_max), fp8_max)
        tl.store(Q + t * stride_q + cols, q.to(Q.dtype.element_ty), mask=cols < N)


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, N) -> (float8_e4m3fn (M, N), float32 scale (M, 1)) with x ~= q * scale, one kernel."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, n = x.shape
    q = torch.empty((m, n), dtype=FP8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _per_token_quant_kernel[(m,)](x, q, scale, x.stride(0), q.stride(0), n, FP8_MAX, MIN_AMAX,
                                      BLOCK=min(4096, triton.next_power_of_2(n)), num_warps=8,
                                      **pdl_args(x.device))
    return q, scale
