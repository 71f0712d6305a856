"""How close cuBLAS runs a prefill's linear layers to the device's floor, by prompt tokens (issue 20: TTFT).

A 256-token prefill of the 8B shape took 8.5 ms of GPU time on an H100, 83% of it in these GEMMs, where the floor
(weights read once, or the FLOPs at the measured matmul rate, whichever is longer) is ~5.5 ms. Short prompts are
between the two regimes: too few rows to fill 132 SMs with large tiles, too many for the few-rows decode kernels.
This prints each layer's time, its TFLOP/s and its share of that floor, row count by row count.

    python3 scripts/bench_prefill_gemm.py [--shapes llama8b] [--rows 64,128,256,512,1024,2048]
"""

import argparse

import torch
from bench_fp8_gemm import SHAPES
from gpu_timing import time_ms

from gridserve.bench.roofline import measure_device


def time_layer(m: int, w: torch.Tensor, rates) -> tuple[float, float]:
    """(ms per call of an m-row product with w, the floor in ms): FLOPs at the matmul rate or bytes moved once."""
    n, k = w.shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.mm(x, w.t(), out=out), graph=True, iters=50)
    floor_s = max(2 * m * n * k / rates.matmul_flops, (w.numel() + x.numel() + out.numel()) * 2 / rates.mem_bw)
    return ms, floor_s * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="llama8b")
    p.add_argument("--rows", default="64,128,256,512,1024,2048")
    a = p.parse_args()
    rates = measure_device("cuda")
    print(rates.describe())
    for model in a.shapes.split(","):
        weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
                   for name, (n, k) in SHAPES[model].items()}
        print(f"\n{model}: ms per call (TFLOP/s, % of floor)")
        print(f"{'rows':>6} " + " ".join(f"{name:>24}" for name in weights) + f" {'layer':>20}")
        for m in (int(r) for r in a.rows.split(",")):
            cells, total, floor_total = [], 0.0, 0.0
            for w in weights.values():
                ms, floor = time_layer(m, w, rates)
                total, floor_total = total + ms, floor_total + floor
                cells.append(f"{ms:8.4f} ({2 * m * w.numel() / ms / 1e9:5.0f}, {floor * 100 / ms:3.0f}%)")
            layer = f"{total:8.4f} ({floor_total * 100 / total:3.0f}%)"
            print(f"{m:>6} " + " ".join(f"{c:>24}" for c in cells) + f" {layer:>20}")

if __name__ == "__main__":
    main()
