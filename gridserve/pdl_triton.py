"""The Triton side of programmatic dependent launch (gridserve/pdl.py): what a kernel may do before `gdc_wait`.

Before its wait a kernel may read only what no kernel of the chain before it writes in this step (weights, the
KV cache of earlier tokens, the step's inputs): with PDL each kernel of the chain has waited for the one before
it before it let the next be scheduled, so all but the immediate predecessor have finished. prefetch_l2 starts
such bytes on their way into L2 while the predecessor still runs.
"""

import triton
import triton.language as tl


@triton.jit
def prefetch_l2(ptrs):
    """Starts each address's 128-byte line on its way into L2 (PTX prefetch); nothing waits for it."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
