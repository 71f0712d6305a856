"""The Triton extend attention kernel on a long prompt's chunks (GPU only): one request, a chunk of --chunk new
tokens after prefixes of 0, 1, 2, 3 chunks (a 32k prompt in 8k chunks), over launch settings. Prints ms and
TFLOP/s (causal: the chunk's queries times the keys each sees, QK^T and PV) per setting; --sweep tries the grid.

    python3 scripts/bench_extend_kernel.py [--heads 32 --kv-heads 8 --head-dim 128 --chunk 8192] [--sweep]"""

import argparse
import itertools

import torch
from gpu_timing import time_ms

from gridserve.attention.triton_ops.extend_attention import extend_attention, extend_config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--chunks", type=int, default=4)
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
    configs = [default]
    if a.sweep:
        configs += [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3)) if c != default]
    print(f"{torch.cuda.get_device_name()}: {a.heads} heads / {a.kv_heads} KV heads x {d}, chunks of {a.chunk}; "
          f"default (BLOCK_M, BLOCK_N, warps, stages) {default}")
    print("prefix | config | ms | TFLOP/s")
    for i in range(a.chunks):
        prefix = i * a.chunk
        flops = 4 * a.heads * d * a.chunk * (prefix + (a.chunk + 1) / 2)
        timed = []
        for cfg in configs:
            try:
                ms = time_ms(lambda cfg=cfg, prefix=prefix: extend_attention(
                    q, k, v, req_to_token, one(0), one(prefix + a.chunk), one(a.chunk), one(0), d**-0.5, a.chunk,
                    config=cfg), graph=False, iters=5)
            except Exception as e:  # out of shared memory or registers: skip the setting
                print(f"  skip {cfg}: {type(e).__name__}")
                continue
            timed.append((ms, cfg))
        timed.sort()
        for ms, cfg in timed[:4] if a.sweep else timed:
            print(f"{prefix} | {cfg}{' (default)' if cfg == default else ''} | {ms:.2f} | {flops / ms / 1e9:.0f}",
                  flush=True)
        if a.sweep and default not in [c for _, c in timed[:4]]:
            ms = next(m for m, c in timed if c == default)
            print(f"{prefix} | {default} (default) | {ms:.2f} | {flops / ms / 1e9:.0f}", flush=True)


if __name__ == "__main__":
    main()
