"""Achieved memory bandwidth of the Triton decode attention kernel over a grid of launch settings (GPU only).
Reads every K and V row of the batch's contexts once; bytes / time is compared with a device copy's rate.
Usage: python scripts/bench_decode_kernel.py [--heads 16 --kv-heads 8 --head-dim 128 --splits 1,2,4,8,16,32,64]
    [--contexts 512,2048 | --contexts mixed:100-2048] (mixed: each request's context uniform in the range, as in
    bench offline's workload, where short and long contexts share a batch) [--prep]
--prep times the kernel as the models run it at decode: q and the new token's k/v raw, normed (Qwen3's q/k norm)
and rotated in the kernel, which stores the new K/V (DecodePrep). Without it, q arrives rotated and K/V stored."""

import argparse
import functools
import itertools

import torch
from gpu_timing import time_ms

from gridserve.attention.triton_ops.decode_attention import (
    LONG_KV_SPLITS,
    MAX_KV_SPLITS,
    SOLO_LEN,
    DecodePrep,
    DecodeWorkspace,
    decode_attention,
    default_launch,
    default_num_kv_splits,
)
from gridserve.bench.roofline import measure_device


def make_prep(req_to_token: torch.Tensor, seq_lens: torch.Tensor, kv_heads: int, head_dim: int,
              dtype: torch.dtype) -> DecodePrep:
    """What a Qwen3 decode step hands the kernel: each request's new k and v (raw), its last slot and position, the
    rotary frequencies and the q/k norm weights."""
    bs, dev = seq_lens.shape[0], seq_lens.device
    k_new = torch.randn(bs, kv_heads, head_dim, device=dev, dtype=dtype)
    v_new = torch.randn(bs, kv_heads * head_dim, device=dev, dtype=dtype)
    rows = torch.arange(bs, device=dev)
    loc = req_to_token[rows, seq_lens - 1].long()
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, head_dim, 2, device=dev, dtype=torch.float32) / head_dim)
    q_w, k_w = (torch.rand(head_dim, device=dev, dtype=dtype) + 0.5 for _ in range(2))
    return DecodePrep(k_new, v_new, loc, seq_lens - 1, inv_freq, q_weight=q_w, k_weight=k_w)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--contexts", default="512,1024,2048")
    p.add_argument("--splits", default="1,2,4,8,16")
    p.add_argument("--block-n", default="32,64,128")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--top", type=int, default=5, help="settings shown a shape (and the slowest)")
    p.add_argument("--prep", action="store_true", help="rotate q/k and store the new K/V in the kernel, as decode does")
    p.add_argument("--solo", default=str(SOLO_LEN),
                   help="solo_len values for the defaults' lines: contexts up to it run one program a KV head")
    a = p.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    dev, dt = torch.device("cuda"), torch.bfloat16
    bw = measure_device(dev, dt).mem_bw
    print(f"device copy rate {bw / 1e9:.0f} GB/s")
    mixed = a.contexts.startswith("mixed:")
    contexts = [a.contexts] if mixed else ints(a.contexts)
    for bs, ctx in itertools.product(ints(a.batches), contexts):
        if mixed:  # per-request lengths in [lo, hi]; req_to_token rows are hi wide
            lo, hi = (int(x) for x in ctx.split(":")[1].split("-"))
            seq_lens = torch.randint(lo, hi + 1, (bs,), generator=torch.Generator().manual_seed(0)).to(dev)
            width = hi
        else:
            seq_lens, width = torch.full((bs,), ctx, device=dev, dtype=torch.int64), ctx
        slots = int(seq_lens.sum())
        k = torch.randn(slots + 1, a.kv_heads, a.head_dim, device=dev, dtype=dt)
        v = torch.randn_like(k)
        # Shuffled slots: a real pool after many requests is not contiguous.
        perm = torch.randperm(slots, device=dev, dtype=torch.int32) + 1
        req_to_token = torch.zeros(bs, width, device=dev, dtype=torch.int32)
        for r, part in enumerate(perm.split(seq_lens.tolist())):
            req_to_token[r, : part.numel()] = part
        idx = torch.arange(bs, device=dev, dtype=torch.int64)
        q = torch.randn(bs, a.heads, a.head_dim, device=dev, dtype=dt)
        prep = make_prep(req_to_token, seq_lens, a.kv_heads, a.head_dim, dt) if a.prep else None
        moved = 2 * slots * a.kv_heads * a.head_dim * k.element_size()
        rows = []
        for splits, bn, w, st in itertools.product(ints(a.splits), ints(a.block_n), ints(a.warps), ints(a.stages)):
            ws = DecodeWorkspace.allocate(bs, a.heads, a.head_dim, max(splits, MAX_KV_SPLITS), dev)
            run = functools.partial(decode_attention, q, k, v, req_to_token, idx, seq_lens, 0.088, workspace=ws,
                                    block_n=bn, num_warps=w, num_stages=st, prep=prep)
            try:
                ms = time_ms(run, graph=True)  # from a CUDA graph, as decode runs: no launch overhead
            except Exception as e:  # out of shared memory etc.: skip the setting
                print(f"  skip splits={splits} block_n={bn} warps={w} stages={st}: {type(e).__name__}")
                continue
            rows.append((moved / ms / 1e6, ms, splits, bn, w, st))
        rows.sort(reverse=True)
        print(f"batch {bs} context {ctx}: {moved / 1e9:.2f} GB of KV")
        for gbs, ms, splits, bn, w, st in rows[: a.top] + rows[-1:]:
            print(f"  {gbs:7.0f} GB/s ({100 * gbs * 1e9 / bw:3.0f}%) {ms * 1e3:8.1f} us  "
                  f"splits={splits} block_n={bn} warps={w} stages={st}")
        # the server's workspace is sized for its largest graph batch: room for a small batch's long grid
        ws = DecodeWorkspace.allocate(max(bs, LONG_KV_SPLITS // MAX_KV_SPLITS), a.heads, a.head_dim, device=dev)
        # the merge in stage 1's last program (the default), or in a second kernel; then each solo_len
        for merge, solo in [(True, SOLO_LEN), (False, SOLO_LEN)] + [(True, s) for s in ints(a.solo) if s != SOLO_LEN]:
            ms = time_ms(functools.partial(decode_attention, q, k, v, req_to_token, idx, seq_lens, 0.088,
                                           workspace=ws, merge_in_stage1=merge, solo_len=solo, prep=prep),
                         graph=True)
            block_n, stages = default_launch(bs, a.heads // a.kv_heads, k.dtype)
            print(f"  defaults ({default_num_kv_splits(bs, a.kv_heads, dev)} splits, block_n {block_n}, {stages} "
                  f"stages, {'one kernel' if merge else 'two kernels'}, solo_len {solo}): {moved / ms / 1e6:.0f} GB/s, "
                  f"{ms * 1e3:.1f} us")


if __name__ == "__main__":
    main()
