"""What the decode GEMM's variants cost a Hopper SM, without a GPU: each is compiled for sm_90 with Triton's own
ptxas (as a launch would specialise it: pointers, N, K and strides divisible by 16), and cuobjdump reports its
registers, shared memory and spills; the PTX tells how it loads the weights and, with PDL, that it waits for the
kernel before (gdc_wait) and where it triggers the next. A GPU lease is scarce; this shows before one whether a tile
fits.

    TRITON_INTERPRET=0 python3 scripts/kernel_resources.py [--pdl [early|late]] [--swap]
        [--tiles M:BLOCK_N:BLOCK_K:WARPS:STAGES ...]
"""

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gridserve import pdl
from gridserve.layers.decode_gemm import FEW_ROWS_SWAP, NORMED_BLOCK, _decode_gemm_kernel

ARGS = ["X", "R", "RO", "NW", "NO", "W", "S", "B", "Y", "RY", "P", "M", "N", "K", "NP", "stride_xm", "stride_wn",
        "stride_ym", "eps"]
NOT_DIVISIBLE = {"M", "NP", "eps"}  # any value; tensors (even unused ones) are 16-byte aligned, as torch's are
# (rows, BLOCK_N, BLOCK_K, warps, stages): one row on the CUDA cores (unpipelined, and with two tiles of loads
# ahead: cp.async into shared memory), 2-16 rows on tl.dot
DEFAULT_TILES = ["1:8:1024:8:1", "1:8:1024:8:3", "16:32:512:4:4"]


def compile_variant(m: int, block_n: int, block_k: int, warps: int, stages: int, fp8: bool, pdl: int,
                    swap: bool = False):
    """The decode GEMM (a residual add and RMSNorm before the product) compiled for sm_90; swap: 2-16 rows as
    W x^T (decode_gemm.FEW_ROWS_SWAP); pdl: 0, or gridserve.pdl's EARLY or LATE trigger."""
    w = "*fp8e4nv" if fp8 else "*bf16"
    sig = dict(zip(ARGS, ["*bf16"] * 5 + [w, "*fp32", "*bf16", "*bf16", "*bf16", "*fp32"] + ["i32"] * 7 + ["fp32"],
                   strict=True))
    consts = dict(HAS_SCALE=fp8, HAS_BIAS=False, GATED=False, NORM=True, HAS_RES=True, STORE_NORMED=False,
                  SUM_OUT=False, SQ_FROM_P=False, BLOCK_P=1, NORMED_BLOCK=NORMED_BLOCK,
                  SWAP=m > 1 and swap, BLOCK_M=m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION="tf32",
                  STAGES=stages, PDL=pdl)
    sig.update(dict.fromkeys(consts, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(ARGS) if name not in NOT_DIVISIBLE}
    return triton.compile(ASTSource(fn=_decode_gemm_kernel, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def resources(kernel) -> dict:
    """Registers and local (spilled) bytes from cuobjdump, shared memory (dynamic, as Triton allocates it) from the
    kernel's metadata; the PTX's global loads; whether it waits for the kernel before (PDL), and where it lets the
    next one be scheduled: "first" (before any global load), "after loads" (after the last), "between loads" or
    "none"."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"(REG|LOCAL):(\d+)", usage))
    ptx = kernel.asm["ptx"]
    loads = re.findall(r"(cp\.async\.cg|ld\.global(?:\.v\d)?\.b\d+)", ptx)
    return {"registers": int(found.get("REG", 0)), "shared": kernel.metadata.shared,
            "spilled": int(found.get("LOCAL", 0)), "loads": {k: loads.count(k) for k in sorted(set(loads))},
            "waits": "griddepcontrol.wait" in ptx, "trigger": _trigger(ptx)}


def _trigger(ptx: str) -> str:
    at = ptx.find("griddepcontrol.launch_dependents")
    if at < 0:
        return "none"
    loads = [m.start() for m in re.finditer(r"cp\.async\.cg|ld\.global", ptx)]
    return "first" if not loads or at < loads[0] else "after loads" if at > loads[-1] else "between loads"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiles", nargs="+", default=DEFAULT_TILES, help="rows:BLOCK_N:BLOCK_K:warps:stages")
    p.add_argument("--pdl", nargs="?", const="early", choices=["early", "late"],
                   help="the PDL variants (gdc_wait first; the trigger at once, or after the K loop)")
    p.add_argument("--swap", action="store_true", help="2-16 rows as W x^T (FEW_ROWS_SWAP)")
    a = p.parse_args()
    pdl_const = {None: 0, "early": pdl.EARLY, "late": pdl.LATE}[a.pdl]
    print("rows, BLOCK_N, BLOCK_K, warps, stages | weights | registers | shared B | spilled B | loads in the PTX "
          "| waits (PDL) | trigger")
    for tile in a.tiles:
        m, block_n, block_k, warps, stages = map(int, tile.split(":"))
        for fp8 in (False, True):
            r = resources(compile_variant(m, block_n, block_k, warps, stages, fp8, pdl_const,
                                          a.swap or FEW_ROWS_SWAP))
            print(f"{tile} | {'FP8' if fp8 else 'bf16'} | {r['registers']} | {r['shared']} | {r['spilled']} | "
                  f"{r['loads']} | {r['waits']} | {r['trigger']}", flush=True)


if __name__ == "__main__":
    main()
