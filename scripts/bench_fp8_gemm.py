"""FP8 linear layers at decode batch sizes on the GPU: the weight-only Triton kernel (w8a16_linear), the W8A8
path (per-token quantization + torch._scaled_mm) and bf16 F.linear, on Llama-3.1-8B's four linear shapes. Each
timing replays a CUDA graph over all four shapes with `--layers` copies of the weights (no L2 reuse). Bandwidth
counts the weights' bytes.

    python3 scripts/bench_fp8_gemm.py [--batches 1,4,16] [--sweep]

--sweep first times w8a16_linear's tile settings at batch 1 and uses the fastest."""

import argparse
import itertools

import torch
import torch.nn.functional as F

from gridserve.layers import fused_ops
from gridserve.layers.quantization import FP8, quantize_per_channel, quantize_per_token

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def graph_ms(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sweep", action="store_true")
    a = p.parse_args()
    dev = "cuda"
    bf16 = [{n: torch.randn(s, device=dev, dtype=torch.bfloat16) / 64 for n, s in SHAPES.items()}
            for _ in range(a.layers)]
    fp8 = [{n: quantize_per_channel(w) for n, w in layer.items()} for layer in bf16]
    nbytes = sum(r * c for r, c in SHAPES.values()) * a.layers
    print(f"{torch.cuda.get_device_name()}: {a.layers} layers x {len(SHAPES)} shapes, {nbytes / 1e6:.0f} MB of FP8")

    def w8a16(x, config):
        return lambda: [fused_ops.w8a16_linear(x[w.shape[1]], w, s, config=config)
                        for layer in fp8 for w, s in layer.values()]

    def xs(m):
        return {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k in {c for _, c in SHAPES.values()}}

    config = fused_ops.W8A16_CONFIG
    if a.sweep:
        x = xs(1)
        timed = []
        for cfg in itertools.product((8, 16, 32, 64), (128, 256, 512), (4, 8), (2, 3, 4)):
            try:
                timed.append((graph_ms(w8a16(x, cfg)), cfg))
            except Exception as e:  # out of shared memory or registers: skip the setting
                print(f"  skip {cfg}: {type(e).__name__}")
        timed.sort()
        print("sweep (BLOCK_N, BLOCK_K, warps, stages): " + ", ".join(
            f"{c} {ms * 1e3:.0f} us" for ms, c in timed[:6]))
        config = timed[0][1]
    print("batch | w8a16 ms | GB/s | w8a8 (_scaled_mm) ms | bf16 ms (2x the bytes)")
    for m in map(int, a.batches.split(",")):
        x = xs(m)
        t16 = graph_ms(w8a16(x, config))

        def w8a8(x=x):
            for layer in fp8:
                for w, s in layer.values():
                    q, xs_ = quantize_per_token(x[w.shape[1]])
                    torch._scaled_mm(q, w.t(), scale_a=xs_, scale_b=s.view(1, -1), out_dtype=torch.bfloat16)

        t8 = graph_ms(w8a8)
        tb = graph_ms(lambda x=x: [F.linear(x[w.shape[1]], w) for layer in bf16 for w in layer.values()])
        assert fp8[0]["o"][0].dtype == FP8
        print(f"{m} | {t16:.3f} | {nbytes / t16 / 1e6:.0f} | {t8:.3f} | {tb:.3f}", flush=True)


if __name__ == "__main__":
    main()
