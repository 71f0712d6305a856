"""Linear layers at decode batch sizes on the GPU, shape by shape: cuBLAS (F.linear) in bf16 against the Triton
decode GEMM (decode_gemm.decode_linear) on bf16 weights, and on FP8 weights against the W8A8 path (per-token
quantization + torch._scaled_mm). Each timing replays a CUDA graph over `--layers` copies of the weights (no L2
reuse). GB/s counts the weights' bytes.

    python3 scripts/bench_fp8_gemm.py [--shapes llama8b,qwen3-0.6b,qwen3-30b-a3b] [--batches 1,4,16]
        [--sweep | --sweep-shapes | --fused | --few-rows] [--stages 1,2,3,4]

--sweep first times decode_linear's tile settings for 2-16 rows (tl.dot) at batch 16 on the first model's shapes,
for FP8 and for bf16 weights, and uses the fastest of each above batch 1 (batch 1 takes decode_gemm_config's
tiles). --sweep-shapes times the one-row tiles on every shape alone (bf16) against decode_gemm_config's pick and
cuBLAS. --stages alone times each shape's one-row pick at each of those stage counts (1: the K loop unpipelined;
more: that many - 1 tiles of loads ahead), bf16 and FP8; with --sweep-shapes they are its grid's stages.
--fused instead times, in bf16 at each of --batches, each projection with the work before it (the residual
add + RMSNorm then qkv or gate/up; the SiLU-and-mul then down) as separate kernels (rms_norm or silu_and_mul, then
the product as linear.apply_linear picks it) against the one decode GEMM that does both: the model folds only at
one row, and this shows whether the fold would pay at more. --few-rows times, at 4 rows (2-16 rows share the
tl.dot path's 16-row tiles) and on every shape, called as the model calls it (with the split norm's halves where
it splits), that path's tiles (BLOCK_N, BLOCK_K, warps, stages) against today's pick, for bf16 and FP8 weights,
with cuBLAS and the same shape at one row for scale."""

import argparse
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from gpu_timing import time_ms

from gridserve.layers import decode_gemm, fused_ops
from gridserve.layers.linear import NORM_FOLD_MAX_K, apply_linear
from gridserve.layers.quantization import quantize_per_channel, quantize_per_token

# (rows, columns) of each linear layer at tp 1
SHAPES = {
    "llama8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "qwen3-0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072)},
    "qwen3-30b-a3b": {"qkv": (5120, 2048), "o": (2048, 4096), "router": (128, 2048)},
}


def graph_us(fn) -> float:
    return time_ms(fn, graph=True, iters=20) * 1e3


def sweep(weights: list, x: dict, scaled: bool,
          grid: tuple = ((8, 16, 32), (128, 256, 512), (4, 8), (3, 4)), label: str = "") -> tuple:
    """The fastest tiles over the weights, whose times are per copy (len(weights) of them)."""
    timed = []
    for cfg in itertools.product(*grid):
        try:
            timed.append((graph_us(lambda cfg=cfg: [
                decode_gemm.decode_linear(x[w[0].shape[1]], *(w if scaled else w[:1]), config=cfg)
                for w in weights]) / len(weights), cfg))
        except Exception as e:  # out of shared memory or registers: skip the setting
            print(f"  skip {cfg}: {type(e).__name__}")
    timed.sort()
    print(f"sweep {label}{'FP8' if scaled else 'bf16'} (BLOCK_N, BLOCK_K, warps, stages): "
          + ", ".join(f"{c} {us:.0f} us" for us, c in timed[:5]), flush=True)
    return timed[0][1]


def time_shape(x: torch.Tensor, bf16: list, fp8: list, cfg16: tuple, cfg8: tuple) -> tuple[float, ...]:
    """Microseconds per weight copy: cuBLAS bf16, Triton bf16, Triton FP8, W8A8."""

    def w8a8():
        for w, s in fp8:
            q, x_scale = quantize_per_token(x)
            torch._scaled_mm(q, w.t(), scale_a=x_scale, scale_b=s.view(1, -1), out_dtype=torch.bfloat16)

    dl = decode_gemm.decode_linear
    runs = (lambda: [F.linear(x, w) for w in bf16], lambda: [dl(x, w, config=cfg16) for w in bf16],
            lambda: [dl(x, w, s, config=cfg8) for w, s in fp8], w8a8)
    return tuple(graph_us(fn) / len(bf16) for fn in runs)


def _fused_pair(name: str, ws: list, x: torch.Tensor, res: torch.Tensor, norm_w: torch.Tensor) -> tuple:
    """(separate kernels, one decode GEMM) over the weight copies ws for projection `name`, at x's rows. The
    separate path is the norm or the SiLU-and-mul kernel, then the product as linear.apply_linear picks it."""
    if name == "down":
        a = torch.randn(x.shape[0], 2 * ws[0].shape[1], device=x.device, dtype=x.dtype)
        return (lambda: [apply_linear(fused_ops.silu_and_mul(a), w) for w in ws],
                lambda: [decode_gemm.decode_linear(a, w, gated=True) for w in ws])
    return (lambda: [apply_linear(fused_ops.rms_norm(x, norm_w, 1e-6, res)[0], w) for w in ws],
            lambda: [decode_gemm.decode_linear_after_norm(x, res, norm_w, 1e-6, w) for w in ws])


def time_fused(model: str, layers: int, rows: int, dev: str = "cuda") -> None:
    """Microseconds per layer copy of each projection with its preceding work, unfused against fused, at `rows`
    rows (where the model folds the work only at one row: whether the fold would pay at more)."""
    shapes = SHAPES[model]
    hidden = shapes["qkv"][1]
    x, res = (torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16) for _ in range(2))
    norm_w = torch.rand(hidden, device=dev, dtype=torch.bfloat16) + 0.5
    for name in ("qkv", "gate_up", "down"):
        if name not in shapes:
            continue
        ws = [torch.randn(shapes[name], device=dev, dtype=torch.bfloat16) / 64 for _ in range(layers)]
        tu, tf = (graph_us(fn) / layers for fn in _fused_pair(name, ws, x, res, norm_w))
        work = "SiLU-and-mul + " if name == "down" else "add + RMSNorm + "
        print(f"{model} | {rows} | {work}{name} | {tu:.1f} | {tf:.1f} | {tu - tf:+.1f}", flush=True)


def _as_the_model_runs(name: str, shape: tuple, x: torch.Tensor) -> Callable:
    """The decode GEMM call that the model makes for projection `name` at x's rows: where the RMSNorm splits over
    two GEMMs (rows wider than NORM_FOLD_MAX_K), o and down add the residual and sum squares
    (decode_linear_add_residual), and qkv and gate_up finish the norm from those sums; else the plain product."""
    n, k = shape
    if name in ("o", "down") and n > NORM_FOLD_MAX_K:
        res = torch.randn(x.shape[0], n, device=x.device, dtype=x.dtype)
        return lambda *w, **kw: decode_gemm.decode_linear_add_residual(x, res, *w, **kw)
    if name in ("qkv", "gate_up") and k > NORM_FOLD_MAX_K:
        norm_w = torch.rand(k, device=x.device, dtype=x.dtype) + 0.5
        default_n = decode_gemm.DECODE_GEMM_CONFIG[0]  # the producer's tiles: its partial sums per row
        sums = torch.rand(x.shape[0], (k + default_n - 1) // default_n, device=x.device) * k
        return lambda *w, **kw: decode_gemm.decode_linear_after_norm(x, None, norm_w, 1e-6, *w,
                                                                     sum_sq_partials=sums, **kw)
    return lambda *w, **kw: decode_gemm.decode_linear(x, *w, **kw)


def time_few_rows(models: list, layers: int, m: int = 4, dev: str = "cuda", swap: bool = False) -> None:
    """The decode GEMM at m rows (tl.dot on 16-row tiles), called as the model calls it (_as_the_model_runs), over
    a grid of tiles against today's pick (decode_gemm_config: the shape's FEW_ROWS_TILES entry, else the default);
    us per weight copy, with cuBLAS and one row's plain product for scale. swap: the grid runs the product
    transposed (decode_gemm.FEW_ROWS_SWAP), with the weight tile as the MMA's long side (64 or 128 rows)."""
    grid = list(itertools.product((64, 128), (64, 128, 256), (4,), (3, 4)) if swap else
                itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4)))
    print(f"model | shape | weights | cuBLAS bf16, {m} rows | one row | today's pick | best (tiles)")
    ranks: dict[tuple, list[float]] = {}
    candidates: dict[tuple, tuple] = {}
    for model in models:
        for name, shape in SHAPES[model].items():
            w16 = [torch.randn(shape, device=dev, dtype=torch.bfloat16) / 64 for _ in range(layers)]
            x = torch.randn(m, shape[1], device=dev, dtype=torch.bfloat16)
            t_cublas = graph_us(lambda x=x, w16=w16: [F.linear(x, w) for w in w16]) / layers
            for fp8 in (False, True):
                ws = [quantize_per_channel(w) for w in w16] if fp8 else [(w,) for w in w16]
                one = x[:1].clone()
                t_one = graph_us(lambda ws=ws, one=one: [decode_gemm.decode_linear(one, *w) for w in ws]) / layers
                call = _as_the_model_runs(name, shape, x)
                t_dot = graph_us(lambda ws=ws, call=call: [call(*w) for w in ws]) / layers
                timed = {}
                decode_gemm.FEW_ROWS_SWAP = swap  # the grid's way round; today's pick above ran the default's
                for cfg in grid:
                    try:
                        timed[cfg] = graph_us(lambda ws=ws, call=call, c=cfg: [call(*w, config=c) for w in ws]) / layers
                    except Exception as e:  # out of shared memory or registers: skip the setting
                        print(f"  skip {cfg}: {type(e).__name__}")
                decode_gemm.FEW_ROWS_SWAP = False
                for cfg, us in timed.items():
                    ranks.setdefault((fp8, cfg), []).append(us / t_dot)
                best = min(timed, key=timed.get)
                print(f"{model} | {name} {shape} | {'FP8' if fp8 else 'bf16'} | {t_cublas:.1f} | {t_one:.1f} | "
                      f"{t_dot:.1f} | {timed[best]:.1f} {best}", flush=True)
                if timed[best] < t_dot - 1.0:
                    candidates[(*shape, 1 if fp8 else 2)] = best
    print("tiles by mean time against the default's over the shapes (lower is better), best five per weights:")
    for fp8 in (False, True):
        ranked = sorted((sum(v) / len(v), cfg) for (f, cfg), v in ranks.items() if f == fp8)
        print(f"  {'FP8' if fp8 else 'bf16'}: " + ", ".join(f"{cfg} {r:.3f}" for r, cfg in ranked[:5]))
    print(f"FEW_ROWS_TILES candidates (over 1 us faster than today's pick; keep only what `bench latency "
          f"--batch-size 4` confirms in the model): {candidates}")


def time_stages(models: list, layers: int, stages: tuple, dev: str = "cuda") -> None:
    """One row on every shape, bf16 and FP8: decode_gemm_config's tiles with each stage count (1: no loads ahead),
    us per weight copy, and the best one's rate in GB/s of the weights' bytes."""
    print("model | shape | weights | " + " | ".join(f"stages {n} us" for n in stages) + " | best GB/s")
    for model in models:
        for name, shape in SHAPES[model].items():
            w16 = [torch.randn(shape, device=dev, dtype=torch.bfloat16) / 64 for _ in range(layers)]
            x1 = torch.randn(1, shape[1], device=dev, dtype=torch.bfloat16)
            for label, ws in (("bf16", [(w,) for w in w16]), ("FP8", [quantize_per_channel(w) for w in w16])):
                pick = decode_gemm.decode_gemm_config(1, ws[0][0])
                times = [graph_us(lambda ws=ws, x1=x1, c=(*pick[:3], n): [decode_gemm.decode_linear(x1, *w, config=c)
                                                                           for w in ws]) / len(ws) for n in stages]
                gbs = ws[0][0].numel() * ws[0][0].element_size() / min(times) / 1e3
                print(f"{model} | {name} {shape} | {label} | " + " | ".join(f"{t:.1f}" for t in times)
                      + f" | {gbs:.0f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="llama8b,qwen3-0.6b,qwen3-30b-a3b")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--fused", action="store_true")
    p.add_argument("--sweep-shapes", action="store_true")
    p.add_argument("--fp8", action="store_true", help="with --sweep-shapes: FP8 weights")
    p.add_argument("--few-rows", action="store_true")
    p.add_argument("--swap", action="store_true", help="with --few-rows: the grid runs the product transposed")
    p.add_argument("--stages", help="one row's stage counts, e.g. 1,2,3,4: alone, each shape's pick at each")
    a = p.parse_args()
    dev, models = "cuda", a.shapes.split(",")
    print(f"{torch.cuda.get_device_name()}: each shape x {a.layers} copies; times per copy")
    if a.few_rows:
        time_few_rows(models, a.layers, swap=a.swap)
        return
    if a.fused:
        print("model | rows | work | separate kernels us | one decode GEMM us | saved us")
        for model, rows in itertools.product(models, map(int, a.batches.split(","))):
            time_fused(model, a.layers, rows)
        return

    def xs(m, shapes):
        return {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k in {c for _, c in shapes.values()}}

    def make(shapes):
        bf16 = {n: [torch.randn(s, device=dev, dtype=torch.bfloat16) / 64 for _ in range(a.layers)]
                for n, s in shapes.items()}
        return bf16, {n: [quantize_per_channel(w) for w in ws] for n, ws in bf16.items()}

    stages = tuple(map(int, a.stages.split(","))) if a.stages else (1,)
    if a.stages and not a.sweep_shapes:
        time_stages(models, a.layers, stages)
        return
    if a.sweep_shapes:  # one row (the dot-product path): the tiles per shape against decode_gemm_config's pick
        # FP8 (--fp8): per-channel scaled weights, half the bytes an element, so K tiles up to 2,048
        grid = ((4, 8, 16, 32), (512, 1024, 2048) if a.fp8 else (256, 512, 1024), (4, 8), stages)
        tiles = {}
        for model in models:
            for name, shape in SHAPES[model].items():
                w16 = [torch.randn(shape, device=dev, dtype=torch.bfloat16) / 64 for _ in range(a.layers)]
                ws = [quantize_per_channel(w) for w in w16] if a.fp8 else [(w,) for w in w16]
                x1 = torch.randn(1, shape[1], device=dev, dtype=torch.bfloat16)
                pick = decode_gemm.decode_gemm_config(1, ws[0][0])
                best = sweep(ws, {shape[1]: x1}, a.fp8, grid, f"{model} {name} {shape}: ")
                t_pick = graph_us(lambda x1=x1, ws=ws: [decode_gemm.decode_linear(x1, *w) for w in ws]) / len(ws)
                t_best = graph_us(lambda x1=x1, ws=ws, c=best: [decode_gemm.decode_linear(x1, *w, config=c)
                                                                for w in ws]) / len(ws)
                t_cublas = graph_us(lambda x1=x1, w16=w16: [F.linear(x1, w) for w in w16]) / len(w16)
                print(f"  pick {pick}: {t_pick:.1f} us; best {best}: {t_best:.1f} us; cuBLAS bf16 {t_cublas:.1f} us",
                      flush=True)
                if t_best < t_pick - 1.0:
                    tiles[(*shape, ws[0][0].element_size())] = best
        print(f"ONE_ROW_TILES entries (more than 1 us faster than the pick): {tiles}")
        return
    cfg8 = cfg16 = decode_gemm.DECODE_GEMM_CONFIG
    if a.sweep:
        bf16, fp8 = make(SHAPES[models[0]])
        x = xs(16, SHAPES[models[0]])
        cfg8 = sweep([w for ws in fp8.values() for w in ws], x, True)
        cfg16 = sweep([(w,) for ws in bf16.values() for w in ws], x, False)
    print("model | shape | batch | cuBLAS bf16 us | Triton bf16 us | GB/s (best bf16) | Triton FP8 us | W8A8 us "
          "| GB/s (Triton FP8)")
    for model in models:
        shapes = SHAPES[model]
        bf16, fp8 = make(shapes)
        for m in map(int, a.batches.split(",")):
            x = xs(m, shapes)
            for name, (rows, cols) in shapes.items():
                cfgs = (cfg16, cfg8) if m > 1 else (None, None)
                tb, tt, t8, t88 = time_shape(x[cols], bf16[name], fp8[name], *cfgs)
                print(f"{model} | {name} | {m} | {tb:.1f} | {tt:.1f} | {2 * rows * cols / min(tb, tt) / 1e3:.0f} | "
                      f"{t8:.1f} | {t88:.1f} | {rows * cols / t8 / 1e3:.0f}", flush=True)


if __name__ == "__main__":
    main()
