"""Programmatic dependent launch (PDL; Hopper and later GPUs), for the Triton kernels of a decode step.

A kernel launched with PDL may be scheduled while the kernel before it on the stream is still running. It calls
`gdc_wait` before it reads anything (which returns once that kernel has finished and its writes are visible), so
what it computes does not change; and it calls `gdc_launch_dependents` to let the kernel after it be scheduled
early in turn. A kernel without PDL before or after it is an ordinary boundary. At batch 1 a decode step is a chain
of 150-400 kernels of a few microseconds each, where the gap between two kernels is a sizable share.

On by default (the model runner calls `set_enabled`; `--disable-pdl` turns it off); never under TRITON_INTERPRET,
which has no `gdc_wait`, nor on GPUs before compute capability 9.0. The launch passes PDL = EARLY or LATE (TRIGGER
says which; 0 when off). A kernel that takes PDL starts with

    if PDL:
        tl.extra.cuda.gdc_wait()
        if PDL == EARLY:  # a short kernel triggers at once whatever PDL is: `if PDL:` alone
            tl.extra.cuda.gdc_launch_dependents()

and a long one (the decode GEMM, the MoE vector kernels, decode attention) also triggers after its main loop's
loads when PDL == LATE, so that the next kernel's programs are scheduled only as its own finish their loads instead
of waiting from the start in SM slots; it is launched with `**pdl.launch_args(device)`. On an H100, against PDL
off: the late trigger took 0.08-0.10 ms off the 30B-A3B shape's batch-1 step, 0.05 off the 8B's (also at batch 4)
and 0.03 off the 0.6B's, and offline throughput stayed (+0.1%); the early one cost 0.02-0.04 ms. Prefetching a
kernel's weights, or its keys and values, into L2 before its `gdc_wait` lost (up to 0.9 ms on the 8B). A graph
keeps the programmatic edges: a launch of a tiny kernel costs 0.9-1.4 us with PDL off and 0.7-0.9 with it
(scripts/bench_pdl_chain.py; docs/benchmarks.md, 2026-12-07). This module imports no Triton: importing Triton
before a test sets TRITON_INTERPRET would leave the kernels unable to run on the interpreter.
"""

import functools
import os

import torch

_enabled = False  # until a model runner sets it from its --disable-pdl
EARLY, LATE = 1, 2  # the PDL constexpr: where a long kernel lets the next one be scheduled
TRIGGER = LATE  # measured in the models on an H100 (docs/benchmarks.md, 2026-12-07): late won, early lost


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = on


def triton_has_pdl() -> bool:
    """Whether this Triton has PDL: `gdc_wait` in kernels and the `launch_pdl` launch option (Triton 3.3 and
    later; the project allows older ones with an older torch). Imports Triton, so only where a kernel is about to
    run on a GPU."""
    import triton.language as tl
    from triton.backends.nvidia.compiler import CUDAOptions

    return hasattr(tl.extra.cuda, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__


@functools.cache
def _supported(device_index: int) -> bool:
    """NVIDIA Hopper and later (ROCm's "cuda" devices have no launch_pdl) with a Triton that has PDL, and not the
    interpreter. PDL is on by default, so a setup without it must fall back, not fail."""
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.version.hip is not None or not triton_has_pdl():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on this device launch with PDL."""
    return _enabled and device.type == "cuda" and _supported(device.index or 0)


def launch_args(device: torch.device) -> dict:
    """The launch's keyword arguments for a kernel that takes PDL: its PDL constexpr (0, EARLY or LATE), and
    Triton's launch_pdl option where it is on."""
    return {"PDL": TRIGGER, "launch_pdl": True} if enabled(device) else {"PDL": 0}
