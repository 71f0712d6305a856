"""Programmatic dependent launch (gridserve/pdl.py): on by default, never on CPU or under the interpreter, and on
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


def test_on_by_default_where_supported_and_never_on_cpu(pdl_on, monkeypatch):
    assert pdl.launch_args(torch.device("cpu")) == {"PDL": 0}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pdl._supported.cache_clear()
    assert not pdl.enabled(torch.device("cuda", 0))  # the interpreter has no gdc_wait; no GPU is asked
    pdl._supported.cache_clear()
    pdl.set_enabled(False)
    assert not pdl.enabled(torch.device("cuda", 0))
    assert ServerArgs(model_path="m").disable_pdl is False


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
@pytest.mark.parametrize("trigger", [pdl.EARLY, pdl.LATE])
def test_a_chain_of_pdl_kernels_in_a_cuda_graph_equals_the_chain_without(pdl_on, monkeypatch, trigger):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(pdl, "TRIGGER", trigger)
    pdl._supported.cache_clear()
    assert pdl.launch_args(torch.device("cuda", 0)) == {"PDL": trigger, "launch_pdl": True}
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


@pytest.mark.parametrize("trigger", ["early", "late"])
def test_the_decode_gemms_pdl_variants_compile_for_hopper_and_spill_nothing(trigger):
    """No GPU needed: scripts/kernel_resources.py compiles the PDL variants (one row, tl.dot; bf16 and FP8 weights)
    for sm_90 with Triton's own ptxas; each waits for the kernel before (gdc_wait) and triggers the next: early
    before any weight load, late after the K loop's (only FP8's row scales load after it); the default tiles spill
    no registers. A separate process: this one's kernels may be the interpreter's."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    from gridserve.layers.decode_gemm import DECODE_GEMM_CONFIG, ONE_ROW_CONFIG

    tiles = [":".join(map(str, (m, *cfg))) for m, cfg in ((1, ONE_ROW_CONFIG), (16, DECODE_GEMM_CONFIG))]
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "kernel_resources.py")
    out = subprocess.run([sys.executable, script, "--pdl", trigger, "--tiles", *tiles], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split(" | ") for line in out.stdout.splitlines()[1:]]
    assert len(rows) == 4  # two tiles, bf16 and FP8 weights
    for tile, weights, *_, spilled, _loads, waits, where in rows:
        assert waits == "True" and spilled == "0", (tile, weights)
        want = {"first"} if trigger == "early" else {"after loads"} if weights == "bf16" else {"between loads"}
        assert where in want, (tile, weights, where)


@pytest.mark.parametrize("disable", [False, True])
def test_the_model_runner_turns_pdl_on_unless_disabled(tmp_path, disable):
    """--disable-pdl reaches pdl.set_enabled through the model runner; on CPU no kernel launches with it either way."""
    from gridserve.model_executor.model_runner import ModelRunner
    from gridserve.model_loader.loader import load_model_config
    from tests.tiny_models import make_tiny_model

    make_tiny_model("llama", tmp_path)
    args = ServerArgs(model_path=str(tmp_path), dtype="float32", device="cpu", max_total_tokens=64,
                      max_running_requests=1, show_progress=False, disable_pdl=disable)
    try:
        ModelRunner(args, str(tmp_path), load_model_config(str(tmp_path)))
        assert pdl._enabled is not disable
        assert pdl.launch_args(torch.device("cpu")) == {"PDL": 0}
    finally:
        pdl.set_enabled(False)


def test_a_triton_without_pdl_turns_it_off_instead_of_failing(pdl_on, monkeypatch):
    """PDL is on by default: on a Triton that lacks it (before 3.3) the kernels launch without it, and no GPU is
    asked (this runs on CPU)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert pdl.triton_has_pdl()  # the Triton the tests install has it
    monkeypatch.setattr(pdl, "triton_has_pdl", lambda: False)
    pdl._supported.cache_clear()
    try:
        assert not pdl.enabled(torch.device("cuda", 0))
        assert pdl.launch_args(torch.device("cuda", 0)) == {"PDL": 0}
    finally:
        pdl._supported.cache_clear()
