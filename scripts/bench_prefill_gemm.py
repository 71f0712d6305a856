"""How close a prefill's linear layers run to the device's floor, by prompt tokens (issue 20: TTFT).

A 256-token prefill of the 8B shape took 8.5 ms of GPU time on an H100, 83% of it in these GEMMs. On an H100
(docs/benchmarks.md, the thirteenth session) cuBLAS ran them at 90-95% of the floor (weights read once, or the
FLOPs at the measured matmul rate, whichever is longer) from 512 rows, but at 76% at 256 rows, where o and down
(4,096 wide) fill 132 SMs with few large tiles. This prints each layer's time, TFLOP/s and share of the floor by row
count; `--variants` also times what could replace `torch.mm` there: `F.linear` (cuBLASLt's own heuristics), the
product with its operands swapped (the weight as the M side), and a plain tiled Triton GEMM over a few tile shapes
(the best shown), so that the next step is chosen on numbers.

    python3 scripts/bench_prefill_gemm.py [--shapes llama8b] [--rows 64,128,256,512,1024,2048] [--variants]
    TRITON_INTERPRET=1 python3 scripts/bench_prefill_gemm.py --check   # the Triton GEMM against torch, on CPU
"""

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bench_fp8_gemm import SHAPES  # (out features, in features) of each linear layer, by model
from gpu_timing import time_ms

from gridserve.bench.roofline import measure_device

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the Triton GEMM tries: few rows want narrow tiles (more programs)
TRITON_TILES = tuple(itertools.product((64, 128), (64, 128, 256), (64,), (4, 8), (3,)))


@triton.jit
def _gemm_kernel(X, W, Y, M, N, K, stride_xm, stride_wn, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Y = X @ W.T, one (BLOCK_M, BLOCK_N) tile a program; programs sweep GROUP_M row tiles per column band, so
    that a band of W is read from L2 by neighbours, not from memory again."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * tiles_n)) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * stride_xm + ks[None, :], mask=(offs_m[:, None] < M) & (ks[None, :] < K),
                    other=0.0)
        w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + ks[None, :],
                    mask=(offs_n[:, None] < N) & (ks[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def triton_gemm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, tiles: tuple) -> torch.Tensor:
    block_m, block_n, block_k, warps, stages = tiles
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _gemm_kernel[grid](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0), BLOCK_M=block_m,
                       BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=stages)
    return out


def floor_ms(m: int, w: torch.Tensor, rates) -> float:
    """FLOPs at the matmul rate or the bytes of weight, input and output moved once, whichever is longer."""
    n, k = w.shape
    return max(2 * m * n * k / rates.matmul_flops, (n * k + m * k + m * n) * w.element_size() / rates.mem_bw) * 1e3


def variants(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, with_others: bool) -> dict:
    """name -> a call computing x @ w.T (the swapped one as its transpose)."""
    calls = {"mm": lambda: torch.mm(x, w.t(), out=out)}
    if with_others:
        out_t = torch.empty(out.shape[1], out.shape[0], device=out.device, dtype=out.dtype)
        calls["linear"] = lambda: F.linear(x, w)
        calls["swapped"] = lambda: torch.mm(w, x.t(), out=out_t)
        for t in TRITON_TILES:
            calls[f"triton{t}"] = lambda t=t: triton_gemm(x, w, out, t)
    return calls


def best_times(m: int, w: torch.Tensor, with_others: bool) -> dict:
    """name -> ms a call of each variant at m rows (Triton: the best tile, under "triton"), by CUDA graph replay."""
    x = torch.randn(m, w.shape[1], device="cuda", dtype=w.dtype)
    out = torch.empty(m, w.shape[0], device="cuda", dtype=w.dtype)
    times = {}
    for name, fn in variants(x, w, out, with_others).items():
        try:
            times[name] = time_ms(fn, graph=True, iters=50)
        except Exception as e:  # noqa: BLE001 - a tile that does not fit (shared memory, registers): skip it
            print(f"  skip {name}: {type(e).__name__}")
    tiles = {k: v for k, v in times.items() if k.startswith("triton(")}
    if tiles:
        best = min(tiles, key=tiles.get)
        times = {k: v for k, v in times.items() if k not in tiles} | {"triton": tiles[best], "tile": best[6:]}
    return times


def check() -> None:
    """The Triton GEMM against torch on small odd shapes: float32 on CPU under TRITON_INTERPRET=1, bf16 on a GPU."""
    gpu = torch.cuda.is_available()
    dev, dt, tol = ("cuda", torch.bfloat16, 2e-2) if gpu else ("cpu", torch.float32, 1e-4)
    for m, n, k in ((5, 40, 70), (33, 96, 64), (130, 17, 200)):
        x, w = torch.randn(m, k, device=dev, dtype=dt), torch.randn(n, k, device=dev, dtype=dt)
        for tiles in TRITON_TILES[:2] if gpu else ((16, 32, 32, 4, 2),):
            out = triton_gemm(x, w, torch.empty(m, n, device=dev, dtype=dt), tiles)
            torch.testing.assert_close(out.float(), x.float() @ w.float().t(), rtol=tol, atol=tol * k**0.5)
    print("triton gemm matches torch")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="llama8b")
    p.add_argument("--rows", default="64,128,256,512,1024,2048")
    p.add_argument("--variants", action="store_true", help="also F.linear, swapped operands and Triton tiles")
    p.add_argument("--check", action="store_true", help="only check the Triton GEMM against torch")
    a = p.parse_args()
    if a.check:
        return check()
    rates = measure_device("cuda")
    print(rates.describe())
    for model in a.shapes.split(","):
        weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
                   for name, (n, k) in SHAPES[model].items()}
        print(f"\n{model}: torch.mm, ms a call (TFLOP/s, % of floor)")
        print(f"{'rows':>6} " + " ".join(f"{name:>24}" for name in weights) + f" {'layer':>20}")
        found = []
        for m in (int(r) for r in a.rows.split(",")):
            cells, total, floor_total = [], 0.0, 0.0
            for name, w in weights.items():
                times, floor = best_times(m, w, a.variants), floor_ms(m, w, rates)
                ms = times["mm"]
                total, floor_total = total + ms, floor_total + floor
                cells.append(f"{ms:8.4f} ({2 * m * w.numel() / ms / 1e9:5.0f}, {floor * 100 / ms:3.0f}%)")
                found.append((m, name, floor, times))
            layer = f"{total:8.4f} ({floor_total * 100 / total:3.0f}%)"
            print(f"{m:>6} " + " ".join(f"{c:>24}" for c in cells) + f" {layer:>20}", flush=True)
        if a.variants:
            print(f"\n{model}: each variant's % of the floor (Triton: its best tile)")
            for m, name, floor, times in found:
                shown = ", ".join(f"{k} {floor * 100 / v:3.0f}%" for k, v in times.items() if k != "tile")
                print(f"{m:>6} {name:>8}: {shown}; Triton's tile {times.get('tile', '-')}")


if __name__ == "__main__":
    main()
