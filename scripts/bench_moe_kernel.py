"""One Qwen3-30B-A3B MoE layer (128 experts, 8 per token, hidden 2048, expert width 768, bf16) on the GPU: the
fused Triton experts (the sorted grouped GEMM and, for few tokens, the matrix-vector path) against the PyTorch
reference, at several batch sizes, each replayed from a CUDA graph (the reference eagerly: it loops in Python
over the experts). Each replay runs `--layers` layers with their own weights, as a model does, so a layer's
experts are not still in L2 from the previous replay. Bandwidth counts the expert weights a batch really
touches (its distinct routed experts), against the device's measured copy bandwidth.

    python3 scripts/bench_moe_kernel.py [--batches 1,2,4,8,16,64,256] [--sweep] [--stages 1,2,3] [--swap on|off]

--sweep first times the matrix-vector kernels' tile settings at batch 1 and uses the fastest; --stages are the
stage counts its grid tries (1: the K loops unpipelined, the default; more: that many - 1 tiles of loads ahead).
--stages without --sweep times the default tiles at each stage count instead.
"""

import argparse
import itertools

import torch
from gpu_timing import time_ms

from gridserve.layers import fused_moe as fm
from gridserve.layers.moe import moe_reference, select_experts
from gridserve.layers.quantization import quantize_per_channel


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), graph=False, iters=20)
    return 2 * a.numel() / (ms / 1e3)


def per_layer_ms(experts, layers, x, weights, ids) -> float:
    """One pass over every layer's weights from one CUDA graph, divided by the layer count."""
    return time_ms(lambda: [experts(x, *layer[:2], weights, ids, **layer[2]) for layer in layers],
                   graph=True) / len(layers)


def fp8_layer(w13: torch.Tensor, w2: torch.Tensor) -> tuple:
    """The layer's experts in FP8 with a scale per (expert, row), as --quantization fp8 stores them."""
    (q13, s13), (q2, s2) = (quantize_per_channel(w.reshape(-1, w.shape[-1])) for w in (w13, w2))
    return q13.view(w13.shape), q2.view(w2.shape), {"w13_scale": s13.view(w13.shape[:2]),
                                                    "w2_scale": s2.view(w2.shape[:2])}


def sweep(layers, x, weights, ids, stages: tuple = (1,), tiles: bool = True) -> dict:
    """The fastest matrix-vector tile settings: gate/up first (down at its default), then down. tiles False: only
    the default tiles, at each of the stage counts."""
    best = dict(fm.VEC_CONFIG)
    if tiles:
        grids = {"gate_up": itertools.product((8, 16, 32), (128, 256, 512), (4, 8), stages),
                 "down": itertools.product((2, 4, 8, 16), (128, 256), (4, 8), stages)}
    else:
        grids = {part: [(*cfg[:3], n) for n in stages] for part, cfg in best.items()}
    for part, grid in grids.items():
        timed = []
        for cfg in grid:
            config = {**best, part: cfg}
            ms = per_layer_ms(lambda *a, c=config, **kw: fm.fused_moe_vec(*a, config=c, **kw), layers, x, weights,
                              ids)
            timed.append((ms, cfg))
        timed.sort()
        print(f"sweep {part}: " + ", ".join(f"{c} {ms * 1e3:.1f} us" for ms, c in timed[:5]), flush=True)
        best[part] = timed[0][1]
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,2,4,8,16,64,256")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--stages", default="", help="stage counts for --sweep, or alone the default tiles at each")
    p.add_argument("--fp8", action="store_true", help="the experts in FP8 (bytes counted as one per weight)")
    p.add_argument("--swap", choices=["on", "off"],
                   help="the sorted path's GEMMs as W a^T or not (fused_moe.SORTED_SWAP; default: its value)")
    a = p.parse_args()
    if a.swap:
        fm.SORTED_SWAP = a.swap == "on"
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    layers = [(torch.randn(a.experts, 2 * a.inter, a.hidden, device=dev, dtype=dt) * a.hidden**-0.5,
               torch.randn(a.experts, a.hidden, a.inter, device=dev, dtype=dt) * a.inter**-0.5, {})
              for _ in range(a.layers)]
    if a.fp8:
        layers = [fp8_layer(w13, w2) for w13, w2, _ in layers]
    weight_bytes = 1 if a.fp8 else 2
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s; {a.layers} layers of weights")
    config = fm.VEC_CONFIG
    batches = list(map(int, a.batches.split(",")))
    if a.sweep or a.stages:
        x = torch.randn(1, a.hidden, device=dev, dtype=dt)
        weights, ids = select_experts(torch.randn(1, a.experts, device=dev), a.top_k, renormalize=True)
        config = sweep(layers, x, weights, ids.to(torch.int32), tuple(map(int, (a.stages or "1").split(","))),
                       a.sweep)
        print(f"vector path settings: {config}")
    print("batch | experts touched | MB read | sorted ms | vector ms | GB/s (best) | % of copy | reference ms | "
          "max |diff|")
    w13, w2, scales = layers[0]
    ref_scales = (scales.get("w13_scale"), scales.get("w2_scale"))
    for m in batches:
        x = torch.randn(m, a.hidden, device=dev, dtype=dt)
        weights, ids = select_experts(torch.randn(m, a.experts, device=dev), a.top_k, renormalize=True)
        ids = ids.to(torch.int32)
        nbytes = ids.unique().numel() * 3 * a.hidden * a.inter * weight_bytes
        sorted_ms = per_layer_ms(fm.fused_moe_sorted, layers, x, weights, ids)
        vec_ms = (per_layer_ms(lambda *args, **kw: fm.fused_moe_vec(*args, config=config, **kw), layers, x, weights,
                               ids) if m <= 64 else float("nan"))
        ref = time_ms(lambda x=x, w=weights, i=ids: moe_reference(x, w13, w2, w, i, *ref_scales), graph=False,
                      iters=3)
        got = fm.fused_moe_vec(x, w13, w2, weights, ids, config, **scales) if m <= 64 else fm.fused_moe_sorted(
            x, w13, w2, weights, ids, **scales)
        diff = (got - moe_reference(x, w13, w2, weights, ids, *ref_scales)).abs().max().item()
        rate = nbytes / (min(sorted_ms, vec_ms if vec_ms == vec_ms else sorted_ms) / 1e3)
        print(f"{m} | {ids.unique().numel()} | {nbytes / 1e6:.1f} | {sorted_ms:.4f} | {vec_ms:.4f} | "
              f"{rate / 1e9:.0f} | {rate / bw:.1%} | {ref:.3f} | {diff:.3g}", flush=True)


if __name__ == "__main__":
    main()
