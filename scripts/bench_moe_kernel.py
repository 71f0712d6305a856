"""One Qwen3-30B-A3B MoE layer (128 experts, 8 per token, hidden 2048, expert width 768, bf16) on the GPU: the
fused Triton experts against the PyTorch reference, at several batch sizes, each replayed from a CUDA graph
(the reference eagerly: it loops in Python over the experts). Bandwidth counts the expert weights a batch really
touches (its distinct routed experts), against the device's measured copy bandwidth.

    python3 scripts/bench_moe_kernel.py [--batches 1,64,256]
"""

import argparse

import torch

from gridserve.layers.fused_moe import fused_moe
from gridserve.layers.moe import moe_reference, select_experts


def time_ms(fn, graph: bool, iters: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), graph=False, iters=20)
    return 2 * a.numel() / (ms / 1e3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    a = p.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    w13 = torch.randn(a.experts, 2 * a.inter, a.hidden, device=dev, dtype=dt) * a.hidden**-0.5
    w2 = torch.randn(a.experts, a.hidden, a.inter, device=dev, dtype=dt) * a.inter**-0.5
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
    print("batch | experts touched | MB read | fused (graph) ms | GB/s | % of copy | reference ms | max |diff|")
    for m in map(int, a.batches.split(",")):
        x = torch.randn(m, a.hidden, device=dev, dtype=dt)
        weights, ids = select_experts(torch.randn(m, a.experts, device=dev), a.top_k, renormalize=True)
        ids = ids.to(torch.int32)
        touched = ids.unique().numel()
        nbytes = touched * 3 * a.hidden * a.inter * 2
        fused = time_ms(lambda x=x, w=weights, i=ids: fused_moe(x, w13, w2, w, i), graph=True)
        ref = time_ms(lambda x=x, w=weights, i=ids: moe_reference(x, w13, w2, w, i), graph=False, iters=5)
        diff = (fused_moe(x, w13, w2, weights, ids) - moe_reference(x, w13, w2, weights, ids)).abs().max().item()
        rate = nbytes / (fused / 1e3)
        print(f"{m} | {touched} | {nbytes / 1e6:.1f} | {fused:.4f} | {rate / 1e9:.0f} | {rate / bw:.1%} | "
              f"{ref:.3f} | {diff:.3g}", flush=True)


if __name__ == "__main__":
    main()
