"""Triton kernels that fuse the elementwise work around the matmuls: RMSNorm (with the residual add), rotary
embedding (alone, or after Qwen3's per-head q/k norms; in decode it also stores K/V into the paged cache),
SiLU-and-mul and FP8 per-token quantization; and the decode GEMM (`decode_linear`: a few rows, weights in bf16
or FP8, one pass over the weights), which can also compute its input: the SiLU-and-mul before a down projection,
or the residual add and RMSNorm before a projection (`decode_linear_after_norm`).

Written in plain PyTorch these are 5-20 kernels each; a decode step of a 28-layer model launched ~2,000
kernels of 1-2 us, which cost more than its matmuls (profile in docs/benchmarks.md). Each function here is one
kernel. The layers call them for CUDA tensors and keep the PyTorch code as the reference (CPU, tests); the
kernels also run on CPU under TRITON_INTERPRET=1, which is how CI checks them.
"""

import torch
import triton
import triton.language as tl

from gridserve.layers.quantization import DECODE_GEMM_MAX_M, FP8, FP8_MAX, MIN_AMAX


@triton.jit
def _rmsnorm_kernel(X, R, W, Y, RO, stride_xt, stride_xh, stride_r, stride_y, stride_ro, H, N, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
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
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n))
    return y if residual is None else (y, res_out)


@triton.jit
def _rope_rows(base, cos, sin, offs, mask, HALF: tl.constexpr):
    x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    return _rotate_and_store(base, x1, x2, cos, sin, offs, mask, HALF)


@triton.jit
def _rotate_and_store(base, x1, x2, cos, sin, offs, mask, HALF: tl.constexpr):
    """Rotates one head's halves, stores them in place and returns them (rounded to the activations' dtype)."""
    dt = base.dtype.element_ty
    y1 = (x1 * cos - x2 * sin).to(dt)
    y2 = (x2 * cos + x1 * sin).to(dt)
    tl.store(base + offs, y1, mask=mask)
    tl.store(base + HALF + offs, y2, mask=mask)
    return y1, y2


@triton.jit
def _head_to_cache(k1, k2, v_row, kc_row, vc_row, offs, mask, HALF: tl.constexpr):
    """One token's rotated k head (k1, k2) and its v head (at v_row) into their paged-cache rows."""
    tl.store(kc_row + offs, k1.to(kc_row.dtype.element_ty), mask=mask)
    tl.store(kc_row + HALF + offs, k2.to(kc_row.dtype.element_ty), mask=mask)
    tl.store(vc_row + offs, tl.load(v_row + offs, mask=mask).to(vc_row.dtype.element_ty), mask=mask)
    tl.store(vc_row + HALF + offs, tl.load(v_row + HALF + offs, mask=mask).to(vc_row.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize_on_alignment=["Pos", "Loc"])  # slices of the batch's one input copy
def _rope_kernel(Q, K, Pos, InvFreq, V, KC, VC, Loc, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                 stride_c, HQ, scaling, HALF: tl.constexpr, BLOCK: tl.constexpr, STORE_KV: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    f = tl.load(Pos + t).to(tl.float32) * tl.load(InvFreq + offs, mask=mask, other=0.0)
    cos = tl.cos(f) * scaling
    sin = tl.sin(f) * scaling
    if h < HQ:
        _rope_rows(Q + t * stride_qt + h * stride_qh, cos, sin, offs, mask, HALF)
    else:
        k1, k2 = _rope_rows(K + t * stride_kt + (h - HQ) * stride_kh, cos, sin, offs, mask, HALF)
        if STORE_KV:
            head = (h - HQ) * 2 * HALF
            row = tl.load(Loc + t).to(tl.int64) * stride_c + head
            _head_to_cache(k1, k2, V + t * stride_vt + head, KC + row, VC + row, offs, mask, HALF)


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
    the paged cache at slots loc: the KV store's own kernel is saved (decode)."""
    n, hq, d = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k must be contiguous in their last dimension")
    if n:
        v, kc, vc, loc, stride_vt, stride_c, store = _cache_args(k, kv_cache)
        _rope_kernel[(n, hq + k.shape[1])](
            q, k, positions, inv_freq, v, kc, vc, loc, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            stride_vt, stride_c, hq, float(scaling), HALF=d // 2, BLOCK=triton.next_power_of_2(d // 2),
            STORE_KV=store)
    return q, k


@triton.jit(do_not_specialize_on_alignment=["Pos", "Loc"])
def _qk_norm_rope_kernel(Q, K, Pos, InvFreq, WQ, WK, V, KC, VC, Loc, stride_qt, stride_qh, stride_kt, stride_kh,
                         stride_vt, stride_c, HQ, scaling, eps, HALF: tl.constexpr, BLOCK: tl.constexpr,
                         STORE_KV: tl.constexpr):
    """One (token, head) of q or k: RMSNorm over the head (rounded to the activation dtype, as the separate
    norm's output is), then the rotary embedding, in place; a k head (and its v) also to the cache if STORE_KV."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    if h < HQ:
        base = Q + t * stride_qt + h * stride_qh
        w = WQ
    else:
        base = K + t * stride_kt + (h - HQ) * stride_kh
        w = WK
    x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
    dt = base.dtype.element_ty
    x1 = (x1 * inv * tl.load(w + offs, mask=mask, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
    x2 = (x2 * inv * tl.load(w + HALF + offs, mask=mask, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
    f = tl.load(Pos + t).to(tl.float32) * tl.load(InvFreq + offs, mask=mask, other=0.0)
    y1, y2 = _rotate_and_store(base, x1, x2, tl.cos(f) * scaling, tl.sin(f) * scaling, offs, mask, HALF)
    if STORE_KV:
        if h >= HQ:
            head = (h - HQ) * 2 * HALF
            row = tl.load(Loc + t).to(tl.int64) * stride_c + head
            _head_to_cache(y1, y2, V + t * stride_vt + head, KC + row, VC + row, offs, mask, HALF)


def qk_norm_rope_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                  k_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor, scaling: float,
                  kv_cache: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q (N, Hq, D) and k (N, Hk, D) with their own weights, then the Neox rotary embedding,
    in place in one kernel (three otherwise: Qwen3's q/k norms and the rotation); returns q and k. kv_cache as
    in rotary_embedding_: the KV store in the same kernel."""
    n, hq, d = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k must be contiguous in their last dimension")
    if n:
        v, kc, vc, loc, stride_vt, stride_c, store = _cache_args(k, kv_cache)
        _qk_norm_rope_kernel[(n, hq + k.shape[1])](
            q, k, positions, inv_freq, q_weight, k_weight, v, kc, vc, loc, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), stride_vt, stride_c, hq, float(scaling), eps, HALF=d // 2,
            BLOCK=triton.next_power_of_2(d // 2), STORE_KV=store)
    return q, k


@triton.jit
def _silu_and_mul_kernel(X, Y, stride_x, stride_y, N, BLOCK: tl.constexpr):
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
                                                                   BLOCK=block)
    return y.view(*x.shape[:-1], n)


@triton.jit
def _per_token_quant_kernel(X, Q, S, stride_x, stride_q, N, fp8_max, min_amax, BLOCK: tl.constexpr):
    """Row program_id(0): amax over the row, scale = amax / fp8_max, q = x / scale in FP8 (two passes over the
    row; the second reads it from L2)."""
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
                                      BLOCK=min(4096, triton.next_power_of_2(n)), num_warps=8)
    return q, scale


@triton.jit
def _gemm_input(X, R, ms, ks, ok, stride_xm, K, GATED: tl.constexpr, HAS_RES: tl.constexpr):
    """A (BLOCK_M, BLOCK_K) tile of the decode GEMM's input before any norm: x; silu(gate) * up (GATED, X = [gate |
    up]); or x + residual (HAS_RES, R laid out as X). Rounded to X's dtype where the unfused kernels round."""
    x_ptrs = X + ms[:, None] * stride_xm + ks[None, :]
    x = tl.load(x_ptrs, mask=ok, other=0.0)
    if GATED:
        gate = x.to(tl.float32)
        up = tl.load(x_ptrs + K, mask=ok, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(x.dtype).to(tl.float32)
        x = (act * up).to(x.dtype)
    if HAS_RES:
        r = tl.load(R + ms[:, None] * stride_xm + ks[None, :], mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _decode_gemm_kernel(X, R, RO, NW, NO, W, S, B, Y, M, N, K, stride_xm, stride_wn, stride_ym, eps,
                        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
                        HAS_RES: tl.constexpr, STORE_NORMED: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Y[:, n-tile] = (X @ W[n-tile].T) (* S[n-tile]) (+ B): W in X's dtype, or FP8 widened to it in registers.
    The input is X as _gemm_input reads it; with NORM, then RMSNorm(that) with weight NW (the weight applied as x
    loads, the row's 1/RMS to the sums, so that one pass over x suffices), and the programs of tile 0 store the
    residual sum (HAS_RES) to RO for the next layer and, with STORE_NORMED, the normed input to NO (for other
    readers of it: an MoE block's experts read what its router GEMM reads).
    BLOCK_M 1 (one row) multiplies on the CUDA cores, a dot product per weight row; 16 (2-16 rows) runs tl.dot."""
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = _gemm_input(X, R, ms, ks, m_ok[:, None] & k_ok[None, :], stride_xm, K, GATED, HAS_RES)
        if NORM:  # the norm's weight now, the row's 1/RMS on the sums: one pass over x, none before the products
            if HAS_RES:
                if pid_n == 0:
                    tl.store(RO + ms[:, None] * stride_xm + ks[None, :], x, mask=m_ok[:, None] & k_ok[None, :])
            xf = x.to(tl.float32)
            sum_sq += tl.sum(xf * xf, 1)
            x = (xf * tl.load(NW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]).to(x.dtype)
        w = tl.load(W + rows[:, None].to(tl.int64) * stride_wn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if BLOCK_M == 1:  # one row: a dot product per weight row (tl.dot would pad the row to 16)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), 1)[None, :]
        else:
            if HAS_SCALE:
                w = w.to(tl.float32).to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if NORM:
        inv = tl.rsqrt(sum_sq / K + eps)
        acc = acc * inv[:, None]
        if STORE_NORMED:
            if pid_n == 0:  # the normed input as rms_norm computes it, for the layers that read it next
                for k0 in range(0, K, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    ok = m_ok[:, None] & (ks < K)[None, :]
                    xs = _gemm_input(X, R, ms, ks, ok, stride_xm, K, GATED, HAS_RES).to(tl.float32)
                    nw = tl.load(NW + ks, mask=ks < K, other=0.0).to(tl.float32)
                    tl.store(NO + ms[:, None] * stride_xm + ks[None, :],
                             (xs * inv[:, None] * nw[None, :]).to(NO.dtype.element_ty), mask=ok)
    if HAS_SCALE:
        acc = acc * tl.load(S + rows, mask=row_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + ms[:, None] * stride_ym + rows[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & row_ok[None, :])


# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the decode GEMM, the fastest of scripts/bench_fp8_gemm.py on an H100
# for 2-byte weights: on 2-16 rows (tl.dot on 16-row tiles; --sweep, the 8B shapes, FP8 and bf16 alike), and on one
# row (the dot-product path; --sweep-shapes: the fastest or within 1 us of it on each 8B, 0.6B and 30B-A3B shape)
DECODE_GEMM_CONFIG = (32, 512, 4, 4)
ONE_ROW_CONFIG = (8, 1024, 8, 4)


def decode_gemm_config(m: int, weight: torch.Tensor) -> tuple[int, int, int, int]:
    """The decode GEMM's tiles for m rows of input. float32 weights take half as wide a K tile, so that the stages
    fit in shared memory."""
    block_n, block_k, warps, stages = ONE_ROW_CONFIG if m == 1 else DECODE_GEMM_CONFIG
    return block_n, block_k // max(1, weight.element_size() // 2), warps, stages


def decode_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None,
                  gated: bool = False) -> torch.Tensor:
    """x (M <= DECODE_GEMM_MAX_M, K) @ weight (N, K).T + bias, in x's dtype, in one kernel with no split over K: for
    decode, where reading the weights is the whole cost. An FP8 weight needs its per-row `weight_scale` and is
    widened in registers (W8A16: the activations are not quantized); otherwise the weight has x's dtype.
    gated: x is [gate | up] (M, 2K) and the input is silu_and_mul(x), computed as it loads (one kernel fewer)."""
    return _decode_gemm(x, weight, weight_scale, bias, config, gated=gated)


def decode_linear_after_norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                             weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
                             bias: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None,
                             return_normed: bool = False) -> tuple[torch.Tensor, ...]:
    """(decode_linear(rms_norm(x + residual)), x + residual) in one kernel: the residual add and the RMSNorm before a
    projection, computed as the GEMM loads its input (two kernels fewer than rms_norm then the GEMM). Without a
    residual (a first layer), the norm of x, and x itself as the residual. return_normed: the normed input too,
    third, for other layers that read it."""
    x = x.contiguous()  # the residual shares x's row stride
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"the residual's shape {tuple(residual.shape)} is not x's {tuple(x.shape)}")
        residual = residual.contiguous()
    residual_out = torch.empty_like(x) if residual is not None else x
    normed = torch.empty_like(x) if return_normed else None
    y = _decode_gemm(x, weight, weight_scale, bias, config, norm=(norm_weight, eps, residual, residual_out, normed))
    return (y, residual_out, normed) if return_normed else (y, residual_out)


def _decode_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, config: tuple[int, int, int, int] | None, gated: bool = False,
                 norm: tuple | None = None) -> torch.Tensor:
    m, k = x.shape
    if gated:
        k //= 2
    if m > DECODE_GEMM_MAX_M:
        raise ValueError(f"decode_linear takes at most {DECODE_GEMM_MAX_M} rows, got {m}")
    if weight.shape[1] != k:
        gated_note = " (half the gated input)" if gated else ""
        raise ValueError(f"decode_linear: input width {k}{gated_note} != the weight's {weight.shape[1]} columns")
    if (weight.dtype == FP8) != (weight_scale is not None):
        raise ValueError("an FP8 weight needs its weight_scale, and only an FP8 weight takes one")
    if x.stride(-1) != 1:
        x = x.contiguous()
    norm_weight, eps, residual, residual_out, normed = norm or (None, 0.0, None, None, None)
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = config or decode_gemm_config(m, weight)
    if m:
        _decode_gemm_kernel[(triton.cdiv(n, block_n),)](
            x, residual, residual_out, norm_weight, normed, weight, weight_scale, bias, y, m, n, k, x.stride(0),
            weight.stride(0), y.stride(0), eps, HAS_SCALE=weight_scale is not None, HAS_BIAS=bias is not None,
            GATED=gated, NORM=norm is not None, HAS_RES=residual is not None, STORE_NORMED=normed is not None,
            BLOCK_M=1 if m == 1 else DECODE_GEMM_MAX_M, BLOCK_N=block_n, BLOCK_K=block_k,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return y
