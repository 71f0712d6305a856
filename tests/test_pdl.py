"""Programmatic dependent launch (gridserve/pdl.py): off by default, never on CPU or under the interpreter, and on
a Hopper GPU a chain of PDL kernels replayed from a CUDA graph computes what the same chain computes without."""

import pytest
import torch

from gridserve import pdl
from gridserve.server_args import ServerArgs


@pytest.fixture
def pdl_on():
    pdl.set_enabled(True)
    yield
    pdl.set_enabled(False)


def test_off_unless_enabled_and_never_on_cpu(pdl_on, monkeypatch):
    assert pdl.launch_args(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pdl._supported.cache_clear()
    assert not pdl.enabled(torch.device("cuda", 0))  # the interpreter has no gdc_wait; no GPU is asked
    pdl._supported.cache_clear()
    pdl.set_enabled(False)
    assert not pdl.enabled(torch.device("cuda", 0))
    assert ServerArgs(model_path="m").enable_pdl is False


def _chain(x, res, norm_w, w1, w2, w3):
    """Kernels that each read the one before: add + RMSNorm, a product, the SiLU-and-mul, two more products."""
    from gridserve.layers import fused_ops
    from gridserve.layers.decode_gemm import decode_linear, decode_linear_after_norm

    h, res2 = fused_ops.rms_norm(x, norm_w, 1e-6, res)
    a = decode_linear(h, w1)
    b = decode_linear(fused_ops.silu_and_mul(a), w2)
    return decode_linear_after_norm(b, res2, norm_w, 1e-6, w3)[0]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="PDL needs a Hopper GPU")
def test_a_chain_of_pdl_kernels_in_a_cuda_graph_equals_the_chain_without(pdl_on, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pdl._supported.cache_clear()
    assert pdl.launch_args(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    torch.manual_seed(0)
    d, inter = 1024, 3072
    x, res = (torch.randn(1, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    norm_w = torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5
    ws = [torch.randn(s, device="cuda", dtype=torch.bfloat16) / 32 for s in ((2 * inter, d), (d, inter), (d, d))]
    pdl.set_enabled(False)
    want = [_chain(x * i, res, norm_w, *ws) for i in range(1, 6)]
    pdl.set_enabled(True)
    _chain(x, res, norm_w, *ws)  # compile the PDL variants before capture
    x_in = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(x_in, res, norm_w, *ws)
    for i in range(1, 6):
        x_in.copy_(x * i)
        graph.replay()
        torch.testing.assert_close(out, want[i - 1], rtol=0, atol=0)


_COMPILE_FOR_HOPPER = '''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gridserve.layers.decode_gemm import _decode_gemm_kernel

names = ["X", "R", "RO", "NW", "NO", "W", "S", "B", "Y", "RY", "P", "M", "N", "K", "NP", "stride_xm", "stride_wn",
         "stride_ym", "eps"]
for fp8, m in ((False, 1), (True, 1), (False, 4), (True, 16)):
    sig = dict(zip(names, ["*bf16"] * 5 + ["*fp8e4nv" if fp8 else "*bf16", "*fp32", "*bf16", "*bf16", "*bf16",
                                           "*fp32"] + ["i32"] * 7 + ["fp32"]))
    consts = dict(HAS_SCALE=fp8, HAS_BIAS=False, GATED=False, NORM=True, HAS_RES=True, STORE_NORMED=False,
                  SUM_OUT=False, SQ_FROM_P=False, BLOCK_P=1, BLOCK_M=m, BLOCK_N=8 if m < 16 else 32,
                  BLOCK_K=512, DOT_PRECISION="tf32", PDL=True, PREFETCH_LINES=32, LINE_ELEMS=128 if fp8 else 64)
    sig.update(dict.fromkeys(consts, "constexpr"))
    kernel = triton.compile(ASTSource(fn=_decode_gemm_kernel, signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 4})
    ptx = kernel.asm["ptx"]
    assert "prefetch.global.L2" in ptx and "griddepcontrol.wait" in ptx, (fp8, m)
    assert ptx.index("prefetch.global.L2") < ptx.index("griddepcontrol.wait"), (fp8, m)
print("compiled")
'''


def test_the_decode_gemms_pdl_variants_compile_for_hopper_with_the_prefetch_before_the_wait():
    """No GPU needed: Triton compiles the PDL variants (one row, FP8, a few rows, tl.dot) for sm_90 with its own
    ptxas, and the weights' L2 prefetch comes before gdc_wait in the PTX. A separate process: this one's kernels
    may be the interpreter's."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
