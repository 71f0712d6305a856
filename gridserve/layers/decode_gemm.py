"""The decode GEMM: a product of a few rows (decode, up to DECODE_GEMM_MAX_M) with weights in bf16 or FP8, in one
Triton kernel that reads the weights once with no split of K. Reading the weights is the whole cost there, and
cuBLAS at one row (and W8A8 FP8) left bandwidth on the table (docs/benchmarks.md).

One row is a dot product per weight row on the CUDA cores; 2-16 rows run tl.dot on 16-row tiles (a CUDA-core path
for 2-8 rows lost to it on an H100: docs/benchmarks.md, the tenth session's lease). The kernel can
compute its own input as it loads: the SiLU-and-mul before a down projection (`decode_linear(gated=True)`), or the
residual add and RMSNorm before a projection (`decode_linear_after_norm`). `linear.apply_linear` decides where it
runs and where it folds. Tested on CPU under TRITON_INTERPRET=1 (tests/test_decode_gemm.py).
"""

import torch
import triton
import triton.language as tl

from gridserve.layers.quantization import DECODE_GEMM_MAX_M, FP8
from gridserve.pdl import launch_args as pdl_args


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
def _decode_gemm_kernel(X, R, RO, NW, NO, W, S, B, Y, RY, P, M, N, K, NP, stride_xm, stride_wn, stride_ym, eps,
                        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
                        HAS_RES: tl.constexpr, STORE_NORMED: tl.constexpr, SUM_OUT: tl.constexpr,
                        SQ_FROM_P: tl.constexpr, BLOCK_P: tl.constexpr, NORMED_BLOCK: tl.constexpr,
                        SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    """Y[:, n-tile] = (X @ W[n-tile].T) (* S[n-tile]) (+ B): W in X's dtype, or FP8 widened to it in registers.
    The input is X as _gemm_input reads it; with NORM, then RMSNorm(that) with weight NW (the weight applied as x
    loads, the row's 1/RMS to the sums, so that one pass over x suffices), and the programs of tile 0 store the
    residual sum (HAS_RES) to RO for the next layer; with STORE_NORMED the programs share out storing the normed
    input to NO (for other readers of it: an MoE block's experts read what its router GEMM reads).
    The RMSNorm split over two GEMMs: with SUM_OUT this GEMM adds the residual RY to its output and each program
    writes the sum of squares of each row of its output tile to P[row, pid] (NP = the output's tiles a row); with
    SQ_FROM_P the next GEMM (NORM, X already that sum) takes each row's sum of squares from its NP partials in P
    instead of summing its own input.
    BLOCK_M 1 (one row) multiplies on the CUDA cores, a dot product per weight row; 16 (2-16 rows) runs tl.dot.
    The K loop keeps STAGES - 1 tiles of loads in flight ahead of the one it multiplies (Triton's pipelining, which
    a launch's num_stages gives only to loops with tl.dot in them: the one-row loop needs it named here)."""
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if PDL:  # programmatic dependent launch (gridserve/pdl.py)
        tl.extra.cuda.gdc_wait()
        if PDL == 1:  # pdl.EARLY; LATE triggers after the loads below
            tl.extra.cuda.gdc_launch_dependents()
    ms = tl.arange(0, BLOCK_M)
    m_ok = ms < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # SWAP's: the product transposed
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = _gemm_input(X, R, ms, ks, m_ok[:, None] & k_ok[None, :], stride_xm, K, GATED, HAS_RES)
        if NORM:  # the norm's weight now, the row's 1/RMS on the sums: one pass over x, none before the products
            if HAS_RES:
                if pid_n == 0:
                    tl.store(RO + ms[:, None] * stride_xm + ks[None, :], x, mask=m_ok[:, None] & k_ok[None, :])
            xf = x.to(tl.float32)
            if not SQ_FROM_P:
                sum_sq += tl.sum(xf * xf, 1)
            x = (xf * tl.load(NW + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]).to(x.dtype)
        w = tl.load(W + rows[:, None].to(tl.int64) * stride_wn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if BLOCK_M == 1:  # one row: a dot product per weight row (tl.dot would pad the row to 16)
            acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), 1)[None, :]
        else:
            if HAS_SCALE:
                w = w.to(tl.float32).to(x.dtype)
            if SWAP:  # W x^T: the weight rows fill the MMA's long side, the few input rows its short one
                acc_t = tl.dot(w, tl.trans(x), acc_t, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if PDL == 2:  # pdl.LATE: the next kernel's programs may be scheduled once this one's have loaded
        tl.extra.cuda.gdc_launch_dependents()
    if SWAP:
        acc = tl.trans(acc_t)
    if NORM:
        if SQ_FROM_P:  # the previous GEMM's partials of each row, summed in a fixed order
            ps = tl.arange(0, BLOCK_P)
            sum_sq += tl.sum(tl.load(P + ms[:, None] * NP + ps[None, :], mask=m_ok[:, None] & (ps < NP)[None, :],
                                     other=0.0), 1)
        inv = tl.rsqrt(sum_sq / K + eps)
        acc = acc * inv[:, None]
        if STORE_NORMED:  # the normed input as rms_norm computes it, for the layers that read it next: each
            # program stores every num_programs-th piece of NORMED_BLOCK features (program 0 storing it all made a
            # serial tail that the next kernel waited for)
            for k0 in range(pid_n * NORMED_BLOCK, K, tl.num_programs(0) * NORMED_BLOCK):
                ks = k0 + tl.arange(0, NORMED_BLOCK)
                ok = m_ok[:, None] & (ks < K)[None, :]
                xs = _gemm_input(X, R, ms, ks, ok, stride_xm, K, GATED, HAS_RES).to(tl.float32)
                nw = tl.load(NW + ks, mask=ks < K, other=0.0).to(tl.float32)
                tl.store(NO + ms[:, None] * stride_xm + ks[None, :],
                         (xs * inv[:, None] * nw[None, :]).to(NO.dtype.element_ty), mask=ok)
    if HAS_SCALE:
        acc = acc * tl.load(S + rows, mask=row_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = m_ok[:, None] & row_ok[None, :]
    y = acc.to(Y.dtype.element_ty)
    if SUM_OUT:  # the residual add after this GEMM, rounded as the unfused add rounds, and its squares' partial sum
        ry = tl.load(RY + ms[:, None] * stride_ym + rows[None, :], mask=out_ok, other=0.0)
        y = (y.to(tl.float32) + ry.to(tl.float32)).to(Y.dtype.element_ty)
        yf = y.to(tl.float32)
        tl.store(P + ms * tl.num_programs(0) + pid_n, tl.sum(yf * yf, 1), mask=m_ok)
    tl.store(Y + ms[:, None] * stride_ym + rows[None, :], y, mask=out_ok)


NORMED_BLOCK = 128  # features a piece of the normed input that STORE_NORMED's programs share out
# 2-16 rows: tl.dot on the product transposed (W x^T), where Hopper's MMA takes the weight tile as its 64-row side
# and the padded input rows as the narrow one, instead of x W^T with the 16 input rows as the long side
FEW_ROWS_SWAP = False

# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the decode GEMM, the fastest of scripts/bench_fp8_gemm.py on an H100
# for 2-byte weights: on 2-16 rows (tl.dot on 16-row tiles; --sweep, the 8B shapes, FP8 and bf16 alike), and on one
# row (the dot-product path; --sweep-shapes: the fastest or within 1 us of it on each 8B, 0.6B and 30B-A3B shape).
# One row's stages are 1 (no loads ahead): with 5 programs of 8 warps on an SM the others' loads fill each one's wait,
# and loads ahead (`bench_fp8_gemm.py --stages`) were 0-3 us slower a GEMM on an H100 (docs/benchmarks.md, 2026-12-07)
DECODE_GEMM_CONFIG = (32, 512, 4, 4)
ONE_ROW_CONFIG = (8, 1024, 8, 1)
# One-row tiles for a weight of (rows, columns, bytes an element) where `bench_fp8_gemm.py --sweep-shapes` found
# tiles faster than ONE_ROW_CONFIG by more than a microsecond (it prints these entries). FP8 weights of the 8B and
# of the 30B-A3B's o_proj (H100, 2026-12-06): K tiles of 2,048 (the bytes of bf16's 1,024), 1.4-3.6 us a GEMM.
# The 30B-A3B's bf16 GEMMs after the split norm, timed in the model (the `tiles` step, H100, 2026-12-07): qkv (5,120 x
# 2,048) in one K tile a program, the step 0.068 ms faster (twice); the router (128 x 2,048, handing the normed input
# to the experts) in 128 programs of a row, not 16 of 8: 0.027 ms faster at 2 rows, 0.015 more at 1. o_proj lost
# with every other tile tried (0.02-0.2 ms slower).
ONE_ROW_TILES: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (6144, 4096, 1): (8, 1024, 4, 1), (4096, 4096, 1): (8, 2048, 8, 1), (28672, 4096, 1): (4, 2048, 4, 1),
    (4096, 14336, 1): (8, 2048, 8, 1), (2048, 4096, 1): (4, 2048, 4, 1),
    (5120, 2048, 2): (8, 2048, 8, 1), (128, 2048, 2): (1, 2048, 4, 1)}
# The same for 2-16 rows (tl.dot on 16-row tiles: the tiles that win at 4 rows win at all of them). Only entries that
# made the 8B's batch-4 step faster in the model itself (bench latency --batch-size 4, H100, 2026-12-06): qkv and
# gate_up, which finish the split RMSNorm, 2-3 us each a layer faster with wider N tiles (bf16 6.032 -> 5.879 ms a
# step; FP8 4.166 -> 3.831). `bench_fp8_gemm.py --few-rows` times each GEMM as the model calls it; an earlier sweep
# of the plain product picked (32, 128, 4, 3) for gate_up, which made the step 0.88 ms slower.
FEW_ROWS_TILES: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (6144, 4096, 2): (64, 256, 4, 3), (28672, 4096, 2): (64, 256, 4, 3),
    (6144, 4096, 1): (64, 512, 4, 3), (28672, 4096, 1): (64, 256, 4, 3)}


def decode_gemm_config(m: int, weight: torch.Tensor) -> tuple[int, int, int, int]:
    """The decode GEMM's tiles for m rows of input: the weight shape's entry in ONE_ROW_TILES or FEW_ROWS_TILES, else
    the default. float32 weights take half as wide a K tile, so that the stages fit in shared memory."""
    key = (*weight.shape, weight.element_size())
    if m == 1:
        block_n, block_k, warps, stages = ONE_ROW_TILES.get(key, ONE_ROW_CONFIG)
    else:
        block_n, block_k, warps, stages = FEW_ROWS_TILES.get(key, DECODE_GEMM_CONFIG)
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
                             return_normed: bool = False,
                             sum_sq_partials: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(decode_linear(rms_norm(x + residual)), x + residual) in one kernel: the residual add and the RMSNorm before a
    projection, computed as the GEMM loads its input (two kernels fewer than rms_norm then the GEMM). Without a
    residual (a first layer), the norm of x, and x itself as the residual. return_normed: the normed input too,
    third, for other layers that read it. sum_sq_partials: x is what decode_linear_add_residual made, and these are
    its rows' partial sums of squares; the kernel sums them instead of x's squares (no residual then)."""
    x = x.contiguous()  # the residual shares x's row stride
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"the residual's shape {tuple(residual.shape)} is not x's {tuple(x.shape)}")
        if sum_sq_partials is not None:
            raise ValueError("sum_sq_partials are those of x with its residual already added: no residual then")
        residual = residual.contiguous()
    if sum_sq_partials is not None and sum_sq_partials.shape[0] != x.shape[0]:
        raise ValueError(f"sum_sq_partials are for {sum_sq_partials.shape[0]} rows, x has {x.shape[0]}")
    residual_out = torch.empty_like(x) if residual is not None else x
    normed = torch.empty_like(x) if return_normed else None
    y = _decode_gemm(x, weight, weight_scale, bias, config, norm=(norm_weight, eps, residual, residual_out, normed),
                     sum_sq_partials=sum_sq_partials)
    return (y, residual_out, normed) if return_normed else (y, residual_out)


def decode_linear_add_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               weight_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                               config: tuple[int, int, int, int] | None = None,
                               gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(decode_linear(x) + residual, partial sums of squares of its rows (M, programs)), for up to
    DECODE_GEMM_MAX_M rows: the first half of an RMSNorm split over two GEMMs. Each program writes the sum of squares
    of each row of its output tile (float32); the GEMM after takes them (decode_linear_after_norm's
    sum_sq_partials) in place of a norm kernel between the two. Folding the whole norm into the GEMM after would
    make each of its programs recompute the rows' sums of squares."""
    m, n = x.shape[0], weight.shape[0]
    if residual.shape != (m, n):
        raise ValueError(f"the residual's shape {tuple(residual.shape)} is not the output's {(m, n)}")
    block_n = (config or decode_gemm_config(m, weight))[0]
    partials = torch.empty((m, triton.cdiv(n, block_n)), dtype=torch.float32, device=x.device)
    y = _decode_gemm(x, weight, weight_scale, bias, config, gated=gated, sum_out=(residual.contiguous(), partials))
    return y, partials


def _decode_gemm(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                 bias: torch.Tensor | None, config: tuple[int, int, int, int] | None, gated: bool = False,
                 norm: tuple | None = None, sum_out: tuple | None = None,
                 sum_sq_partials: torch.Tensor | None = None) -> torch.Tensor:
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
    residual_y, partials = sum_out or (None, sum_sq_partials)
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = config or decode_gemm_config(m, weight)
    num_partials = 0 if partials is None else partials.shape[-1]  # a row's
    if m:
        _decode_gemm_kernel[(triton.cdiv(n, block_n),)](
            x, residual, residual_out, norm_weight, normed, weight, weight_scale, bias, y, residual_y, partials, m, n,
            k, num_partials, x.stride(0), weight.stride(0), y.stride(0), eps, HAS_SCALE=weight_scale is not None,
            HAS_BIAS=bias is not None, GATED=gated, NORM=norm is not None, HAS_RES=residual is not None,
            STORE_NORMED=normed is not None, SUM_OUT=sum_out is not None, SQ_FROM_P=sum_sq_partials is not None,
            BLOCK_P=triton.next_power_of_2(max(num_partials, 1)), NORMED_BLOCK=NORMED_BLOCK,
            SWAP=m > 1 and FEW_ROWS_SWAP, BLOCK_M=1 if m == 1 else DECODE_GEMM_MAX_M,
            BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            STAGES=stages, num_warps=warps, num_stages=stages, **pdl_args(x.device))
    return y
