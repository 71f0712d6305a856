"""Does programmatic dependent launch (PDL, gridserve/pdl.py) shorten a chain of kernels replayed from a CUDA graph?

Two chains, each captured in one graph and timed by CUDA events, with PDL off, on with the early trigger (each
kernel lets the next one be scheduled at its start), and on with the late trigger (after its main loads, as
gridserve's long kernels do, pdl.LATE):
  - `tiny`: CHAIN launches of a kernel of one program, or one an SM, each program reading 4 KB that the launch
    before wrote and writing it plus one: the time a launch costs in a graph, nothing else;
  - `gemm`: the decode GEMM (layers/decode_gemm.py, one row) on the 30B-A3B's attention weights, qkv (5,120 x
    2,048) then o_proj (2,048 x 4,096), for `--layers` layers with their own weights: what PDL buys between
    bandwidth-bound kernels of a few microseconds.
If the tiny chain's microseconds a launch do not fall with PDL, the graph does not keep the launches' programmatic
edges, and PDL in the model could not have gained.

    python3 scripts/bench_pdl_chain.py [--chain 256] [--layers 48]
"""

import argparse

import torch
import triton
import triton.language as tl
from gpu_timing import time_ms

from gridserve import pdl
from gridserve.layers.decode_gemm import decode_linear


@triton.jit
def _step_kernel(src, dst, BLOCK: tl.constexpr, PDL: tl.constexpr, LATE: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        if not LATE:
            tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(src + offs)
    if PDL and LATE:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(dst + offs, x + 1)


def tiny_chain(mode: str, chain: int, programs: int) -> float:
    """Microseconds a launch in a graph of `chain` launches of _step_kernel; checks the chain's result."""
    block = 1024
    a = torch.zeros(programs * block, dtype=torch.float32, device="cuda")
    b = torch.zeros_like(a)
    flags = {"off": dict(PDL=False, LATE=False), "early": dict(PDL=True, LATE=False, launch_pdl=True),
             "late": dict(PDL=True, LATE=True, launch_pdl=True)}[mode]

    def run():
        src, dst = a, b
        for _ in range(chain):
            _step_kernel[(programs,)](src, dst, BLOCK=block, num_warps=4, **flags)
            src, dst = dst, src

    a.zero_()
    run()
    torch.cuda.synchronize()
    want = float(chain)  # each launch adds one to what the one before wrote
    got = (a if chain % 2 == 0 else b)[0].item()
    assert got == want, f"{mode}: the chain computed {got}, not {want}"
    return time_ms(run, graph=True) * 1e3 / chain


def gemm_chain(mode: str, layers: int) -> float:
    """Microseconds a GEMM in a graph of `layers` x (qkv, o_proj) one-row decode GEMMs on their own weights, with
    PDL off, or on with the early or the late trigger."""
    pdl.set_enabled(mode != "off")
    trigger = pdl.TRIGGER
    pdl.TRIGGER = pdl.EARLY if mode == "early" else pdl.LATE
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [(torch.randn(5120, 2048, device="cuda", dtype=torch.bfloat16, generator=g) / 64,
           torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, generator=g) / 64) for _ in range(layers)]
    x0 = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16, generator=g)

    def run():
        x = x0
        for qkv, o in ws:
            x = decode_linear(decode_linear(x, qkv)[:, :4096], o)
        return x

    try:
        return time_ms(run, graph=True) * 1e3 / (2 * layers)
    finally:
        pdl.set_enabled(False)
        pdl.TRIGGER = trigger


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain", type=int, default=256)
    p.add_argument("--layers", type=int, default=48)
    args = p.parse_args()
    if torch.cuda.get_device_capability()[0] < 9:
        raise SystemExit("PDL needs a Hopper or later GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}: {sms} SMs, torch {torch.__version__}, triton {triton.__version__}")
    print("| chain | PDL off us | PDL early us | PDL late us |")
    print("| --- | --- | --- | --- |")
    for programs in (1, sms):
        t = [tiny_chain(m, args.chain, programs) for m in ("off", "early", "late")]
        print(f"| tiny, {programs} program(s) x 4 KB | " + " | ".join(f"{v:.2f}" for v in t) + " |")
    t = [gemm_chain(m, args.layers) for m in ("off", "early", "late")]
    print(f"| decode GEMM, 30B-A3B qkv + o_proj, {args.layers} layers | " + " | ".join(f"{v:.2f}" for v in t) + " |")


if __name__ == "__main__":
    main()
