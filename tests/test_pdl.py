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
    assert pdl.launch_args(torch.device("cpu")) == {"PDL": 0}
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
@pytest.mark.parametrize("trigger,preload", [(pdl.EARLY, 0), (pdl.LATE, 0), (pdl.LATE, 1 << 16)])
def test_a_chain_of_pdl_kernels_in_a_cuda_graph_equals_the_chain_without(pdl_on, monkeypatch, trigger, preload):
    from gridserve.layers import decode_gemm

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(pdl, "TRIGGER", trigger)
    monkeypatch.setattr(decode_gemm, "PRELOAD_BYTES", preload)  # the weights' L2 prefetch before the wait
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


@pytest.mark.parametrize("trigger,preload", [("early", 0), ("late", 0), ("late", 32)])
def test_the_decode_gemms_pdl_variants_compile_for_hopper_and_spill_nothing(trigger, preload):
    """No GPU needed: scripts/kernel_resources.py compiles the PDL variants (one row, tl.dot; bf16 and FP8 weights)
    for sm_90 with Triton's own ptxas; each waits for the kernel before (gdc_wait) and triggers the next: early
    before any weight load, late after the K loop's (only FP8's row scales load after it); with preload lines, L2
    prefetches of the weights come before the wait; the default tiles spill no registers. A separate process: this
    one's kernels may be the interpreter's."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    from gridserve.layers.decode_gemm import DECODE_GEMM_CONFIG, ONE_ROW_CONFIG

    tiles = [":".join(map(str, (m, *cfg))) for m, cfg in ((1, ONE_ROW_CONFIG), (16, DECODE_GEMM_CONFIG))]
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "kernel_resources.py")
    out = subprocess.run([sys.executable, script, "--pdl", trigger, "--preload-lines", str(preload), "--tiles",
                          *tiles], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split(" | ") for line in out.stdout.splitlines()[1:]]
    assert len(rows) == 4  # two tiles, bf16 and FP8 weights
    for tile, weights, *_, spilled, _loads, waits, where, prefetches in rows:
        assert waits == "True" and spilled == "0", (tile, weights)
        want = {"first"} if trigger == "early" else {"after loads"} if weights == "bf16" else {"between loads"}
        assert where in want, (tile, weights, where)
        assert (int(prefetches) > 0) == (preload > 0), (tile, weights, prefetches)


def test_the_weight_preload_needs_the_late_trigger_and_covers_at_most_a_row(monkeypatch):
    from gridserve.layers import decode_gemm

    w = torch.empty(64, 2048, dtype=torch.bfloat16)
    assert decode_gemm._preload_args(w, 2048, torch.device("cpu")) == {"PDL": 0}  # PDL off: nothing added
    monkeypatch.setattr(decode_gemm, "pdl_args", lambda device: {"PDL": pdl.EARLY, "launch_pdl": True})
    monkeypatch.setattr(decode_gemm, "PRELOAD_BYTES", 4096)
    assert "PRELOAD_LINES" not in decode_gemm._preload_args(w, 2048, w.device)  # the early trigger: none
    monkeypatch.setattr(decode_gemm, "pdl_args", lambda device: {"PDL": pdl.LATE, "launch_pdl": True})
    args = decode_gemm._preload_args(w, 2048, w.device)
    assert (args["PRELOAD_LINES"], args["LINE_ELEMS"]) == (32, 64)  # 4 KB of a 4 KB row, in 128-byte lines
    assert decode_gemm._preload_args(w, 100, w.device)["PRELOAD_LINES"] == 2  # 200 bytes: 1.6 lines, rounded up
    fp8 = torch.empty(64, 8192, dtype=torch.uint8)
    assert (decode_gemm._preload_args(fp8, 8192, w.device)["LINE_ELEMS"]) == 128
    monkeypatch.setattr(decode_gemm, "PRELOAD_BYTES", 0)
    assert "PRELOAD_LINES" not in decode_gemm._preload_args(w, 2048, w.device)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="PDL needs a Hopper GPU")
@pytest.mark.parametrize("lens", [[1], [300], [7, 2000, 129]])
def test_decode_attention_with_its_kv_preload_equals_it_without(pdl_on, monkeypatch, lens):
    """The late trigger with the keys and values started into L2 before the wait: the same output, bit for bit."""
    import importlib

    from tests.paged_kv import make_paged_kv

    decode_module = importlib.import_module("gridserve.attention.triton_ops.decode_attention")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pdl._supported.cache_clear()
    g, k, v, r2t, rpi, sl = (t.cuda() if isinstance(t, torch.Tensor) else t
                             for t in make_paged_kv(lens, 4, 128, torch.bfloat16))
    q = torch.randn(len(lens), 32, 128, dtype=torch.bfloat16, device="cuda")
    pdl.set_enabled(False)
    want = decode_module.decode_attention(q, k, v, r2t, rpi, sl, 128**-0.5)
    pdl.set_enabled(True)
    monkeypatch.setattr(pdl, "TRIGGER", pdl.LATE)
    monkeypatch.setattr(decode_module, "PRELOAD_KV", True)
    assert decode_module._preload_args(k, decode_module.check_paged_inputs(q, k, v, r2t)[1], q.device)["PRELOAD_KV"]
    got = decode_module.decode_attention(q, k, v, r2t, rpi, sl, 128**-0.5)
    assert torch.equal(got, want)


def test_decode_attentions_kv_preload_needs_the_late_trigger(monkeypatch):
    import importlib

    m = importlib.import_module("gridserve.attention.triton_ops.decode_attention")
    k = torch.empty(8, 4, 128, dtype=torch.bfloat16)
    q, r2t = torch.empty(1, 32, 128, dtype=torch.bfloat16), torch.zeros(1, 8, dtype=torch.int32)
    sh = m.check_paged_inputs(q, k, k, r2t)[1]
    monkeypatch.setattr(m, "PRELOAD_KV", True)
    assert m._preload_args(k, sh, torch.device("cpu")) == {"PDL": 0}  # PDL off
    monkeypatch.setattr(m, "pdl_args", lambda device: {"PDL": pdl.EARLY, "launch_pdl": True})
    assert "PRELOAD_KV" not in m._preload_args(k, sh, k.device)
    monkeypatch.setattr(m, "pdl_args", lambda device: {"PDL": pdl.LATE, "launch_pdl": True})
    args = m._preload_args(k, sh, k.device)
    assert (args["PRELOAD_KV"], args["K_LINES"], args["V_LINES"], args["LINE_ELEMS"]) == (True, 2, 2, 64)
    monkeypatch.setattr(m, "PRELOAD_KV", False)
    assert "PRELOAD_KV" not in m._preload_args(k, sh, k.device)


def test_decode_attentions_kv_preload_compiles_for_hopper_before_the_wait():
    """No GPU needed: kernel_resources --attention compiles decode attention for sm_90 with the late trigger, with
    and without the preload: L2 prefetches before gdc_wait only with it, and no spills either way."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "kernel_resources.py")
    out = subprocess.run([sys.executable, script, "--attention"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r[0]: r for r in (line.split(" | ") for line in out.stdout.splitlines()[1:])}
    assert set(rows) == {"False", "True"}
    assert rows["False"][-1] == "0" and int(rows["True"][-1]) > 0
    assert rows["False"][3] == rows["True"][3] == "0" and rows["True"][4] == "True"  # no spills; it waits
