"""A long prompt's extend attention: the Triton kernel against the cuDNN path (attention/long_extend.py; GPU only).

One request, a chunk of --chunk new tokens after prefixes of 0..chunks-1 chunks (a 32k prompt in 8k chunks), its
K/V at scattered slots of the paged cache, as a used pool has them. The cuDNN path's time includes the K/V gather,
both fused calls and the merge. Prints ms and TFLOP/s (the causal work, as bench_extend_kernel.py counts it), the
largest difference between the two outputs, and what the cuDNN path's first call at a new shape costs (cuDNN builds
and caches a plan per shape): at each prefix, then for odd chunk lengths after an odd prefix, as the last chunk of
a prompt of any length has them.

    python3 scripts/bench_extend_sdpa.py [--heads 32 --kv-heads 8 --head-dim 128 --chunk 8192 --chunks 4]"""

import time

import torch
from bench_extend_kernel import long_prompt_parser
from gpu_timing import time_ms

from gridserve.attention.long_extend import attend_long, use_ragged_plans
from gridserve.attention.triton_ops.extend_attention import extend_attention


def first_call_ms(fn) -> float:
    """Wall time of one call with its synchronisation, for the first call at a shape."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    a = long_prompt_parser().parse_args()
    use_ragged_plans()  # as the backend does; TORCH_CUDNN_SDPA_AVOID_RECOMPILE=0 in the environment keeps exact plans
    dev, dt, d = torch.device("cuda"), torch.bfloat16, a.head_dim
    total, scale = a.chunk * a.chunks, a.head_dim**-0.5
    k = torch.randn(total + 1, a.kv_heads, d, device=dev, dtype=dt)
    v = torch.randn(total + 1, a.kv_heads, d, device=dev, dtype=dt)
    perm = torch.randperm(total, device=dev) + 1  # scattered slots
    req_to_token = perm.to(torch.int32)[None, :]
    q = torch.randn(a.chunk, a.heads, d, device=dev, dtype=dt)
    out = torch.empty_like(q)
    one = lambda x: torch.tensor([x], device=dev)  # noqa: E731
    print(f"{torch.cuda.get_device_name()}: {a.heads} heads / {a.kv_heads} KV heads x {d}, chunks of {a.chunk}")
    print("prefix | Triton ms (TFLOP/s) | cuDNN path ms (TFLOP/s) | speed-up | max |diff| | cuDNN first call ms")
    for i in range(a.chunks):
        prefix = i * a.chunk
        flops = 4 * a.heads * d * a.chunk * (prefix + (a.chunk + 1) / 2)
        slots = perm[: prefix + a.chunk]
        fns = (lambda prefix=prefix: extend_attention(q, k, v, req_to_token, one(0), one(prefix + a.chunk),  # noqa: E731
                                                      one(a.chunk), one(0), scale, a.chunk),
               lambda slots=slots: attend_long(q, k, v, slots, scale, out))  # noqa: E731
        cold = first_call_ms(fns[1])
        diff = (fns[0]().float() - fns[1]().float()).abs().max().item()
        ms = [time_ms(fn, graph=False, iters=5) for fn in fns]
        print(f"{prefix} | {ms[0]:.2f} ({flops / ms[0] / 1e9:.0f}) | {ms[1]:.2f} ({flops / ms[1] / 1e9:.0f}) | "
              f"{ms[0] / ms[1]:.2f}x | {diff:.4f} | {cold:.1f}", flush=True)
    for n, prefix in ((a.chunk - 777, 5000), (a.chunk - 1234, 9001), (2100, 3333)):  # new shapes, first calls
        slots = perm[: prefix + n]
        fn = lambda n=n, slots=slots: attend_long(q[:n], k, v, slots, scale, out[:n])  # noqa: E731
        cold = first_call_ms(fn)
        warm = first_call_ms(fn)
        want = extend_attention(q[:n], k, v, perm[None, : prefix + n].to(torch.int32), one(0), one(prefix + n),
                                one(n), one(0), scale, n)
        diff = (out[:n].float() - want.float()).abs().max().item()
        print(f"{n} new tokens after {prefix}: first call {cold:.1f} ms, then {warm:.1f} ms; max |diff| {diff:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
