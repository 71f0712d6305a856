"""The prefill's rotary kernels on the GPU: Qwen3-0.6B's q/k norm + rotary (qk_norm_rope_) and the 8B's rotary
(rotary_embedding_), in place on one chunk of tokens, with the KV store and without. GB/s counts q and k read and
written (and the K/V rows stored). Usage: python3 scripts/bench_rope_kernel.py [--tokens 8192]"""

import argparse
import functools

import torch
from gpu_timing import time_ms

from gridserve.layers import fused_ops

SHAPES = {"qwen3-0.6b": (16, 8, 128, True), "llama8b": (32, 8, 128, False)}  # q heads, KV heads, head dim, q/k norm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    a = p.parse_args()
    dev, dt, n = "cuda", torch.bfloat16, a.tokens
    print(f"{torch.cuda.get_device_name()}: {n} tokens, bf16")
    for name, (hq, hk, d, norm) in SHAPES.items():
        qkv = torch.randn(n, (hq + 2 * hk) * d, device=dev, dtype=dt)
        q = qkv[:, : hq * d].view(n, hq, d)
        k = qkv[:, hq * d : (hq + hk) * d].view(n, hk, d)
        v = qkv[:, (hq + hk) * d :]
        pos = torch.arange(n, device=dev)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
        caches = [torch.zeros(n, hk, d, device=dev, dtype=dt) for _ in range(2)]
        w = [torch.rand(d, device=dev, dtype=dt) + 0.5 for _ in range(2)]
        for store in (False, True):
            kv = (*caches, pos, v) if store else None
            if norm:
                fn = functools.partial(fused_ops.qk_norm_rope_, pos, q, k, *w, 1e-6, inv_freq, 1.0, kv)
            else:
                fn = functools.partial(fused_ops.rotary_embedding_, pos, q, k, inv_freq, 1.0, kv)
            us = time_ms(fn, graph=True) * 1e3
            moved = 2 * n * (hq + hk) * d * 2 + (2 * n * hk * d * 2 * 2 if store else 0)
            print(f"{name} {'norm + ' if norm else ''}rotary{' + KV store' if store else ''}: {us:.1f} us, "
                  f"{moved / us / 1e3:.0f} GB/s", flush=True)


if __name__ == "__main__":
    main()
