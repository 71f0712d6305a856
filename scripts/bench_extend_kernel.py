"""The Triton extend attention kernel on a long prompt's chunks (GPU only): one request, a chunk of --chunk new
tokens after prefixes of 0, 1, 2, 3 chunks (a 32k prompt in 8k chunks), over launch settings. Prints ms and
TFLOP/s (causal: the chunk's queries times the keys each sees, QK^T and PV) per setting; --sweep tries the grid.
Each setting runs per query head and, marked "grouped", with a program per GQA group (extend_attention's
group_heads: each K/V block gathered once for the group's heads).

    python3 scripts/bench_extend_kernel.py [--heads 32 --kv-heads 8 --head-dim 128 --chunk 8192] [--sweep]"""

import argparse
import itertools

import torch
from gpu_timing import time_ms

from gridserve.attention.triton_ops.extend_attention import extend_attention, extend_config


def long_prompt_parser() -> argparse.ArgumentParser:
    """The attention shape (the 8B's by default) and a long prompt's chunks, for this script and its cuDNN twin."""
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--chunks", type=int, default=4)
    return p


def main() -> None:
    p = long_prompt_parser()
    p.add_argument("--sweep", action="store_true")
    a = p.parse_args()
    dev, dt, d = torch.device("cuda"), torch.bfloat16, a.head_dim
    total = a.chunk * a.chunks
    k = torch.randn(total + 1, a.kv_heads, d, device=dev, dtype=dt)
    v = torch.randn(total + 1, a.kv_heads, d, device=dev, dtype=dt)
    req_to_token = torch.arange(1, total + 1, device=dev, dtype=torch.int32)[None, :]  # a fresh request's slots
    q = torch.randn(a.chunk, a.heads, d, device=dev, dtype=dt)
    one = lambda x: torch.tensor([x], device=dev)  # noqa: E731
    default = extend_config(a.chunk)
    configs = [(default, False), (default, True)]
    if a.sweep:
        configs += [(c, False) for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3)) if c != default]
        configs += [(c, True) for c in ((128, 64, 8, 3), (128, 128, 8, 2), (256, 64, 8, 3), (256, 32, 8, 3))]
    print(f"{torch.cuda.get_device_name()}: {a.heads} heads / {a.kv_heads} KV heads x {d}, chunks of {a.chunk}; "
          f"default (BLOCK_M, BLOCK_N, warps, stages) {default}")
    print("prefix | config | ms | TFLOP/s")
    for i in range(a.chunks):
        prefix = i * a.chunk
        flops = 4 * a.heads * d * a.chunk * (prefix + (a.chunk + 1) / 2)
        timed = []
        for cfg, grouped in configs:
            try:
                ms = time_ms(lambda cfg=cfg, grouped=grouped, prefix=prefix: extend_attention(
                    q, k, v, req_to_token, one(0), one(prefix + a.chunk), one(a.chunk), one(0), d**-0.5, a.chunk,
                    config=cfg, group_heads=grouped), graph=False, iters=5)
            except Exception as e:  # out of shared memory or registers: skip the setting
                print(f"  skip {cfg}{' grouped' if grouped else ''}: {type(e).__name__}")
                continue
            timed.append((ms, cfg, grouped))
        timed.sort()
        shown = timed[:4] if a.sweep else timed
        shown += [t for t in timed if t[1] == default and t not in shown]  # the default, both ways
        for ms, cfg, grouped in shown:
            label = f"{cfg}{' grouped' if grouped else ''}{' (default)' if cfg == default and not grouped else ''}"
            print(f"{prefix} | {label} | {ms:.2f} | {flops / ms / 1e9:.0f}", flush=True)


if __name__ == "__main__":
    main()
