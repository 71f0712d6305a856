"""Prefill through the piecewise graph runner (static buffers, padding to a captured token count, cuts at each
attention) gives the eager forward's logits and writes the KV cache the same way. On CPU the pieces run
eagerly (capture=False); on CUDA the same script replays captured graphs."""

import pytest
import torch

from gridserve.model_executor.piecewise_graph_runner import PiecewiseGraphRunner, capture_token_counts
from tests.logits_script import make_runner, run_script
from tests.tiny_models import make_tiny_model


def test_capture_token_counts():
    assert capture_token_counts(2048)[:4] == [16, 32, 64, 96] and capture_token_counts(2048)[-1] == 2048
    assert capture_token_counts(100) == [16, 32, 64, 96, 100]
    assert capture_token_counts(8) == [8]
    counts = capture_token_counts(16384)
    assert all(b / a <= 1.5 for a, b in zip(counts[2:], counts[3:], strict=False))


def _compare(path, device: str, max_tokens: int, capture: bool, backend: str = "torch"):
    eager = make_runner(path, device=device, attention_backend=backend)
    want = run_script(eager)
    runner = make_runner(path, device=device, attention_backend=backend)
    runner.prefill_graphs = PiecewiseGraphRunner(runner, max_tokens, capture=capture)
    got = run_script(runner)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # every slot but the padding slot 0 holds the same K/V
    for a, b in zip(eager.kv_cache.k_buffers + eager.kv_cache.v_buffers,
                    runner.kv_cache.k_buffers + runner.kv_cache.v_buffers, strict=True):
        torch.testing.assert_close(b[1:], a[1:], rtol=0, atol=0)
    return runner


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_padded_pieces_match_eager_on_cpu(kind, tmp_path):
    make_tiny_model(kind, tmp_path)
    # the script's prefills have 39 tokens (padded to 64) and 23 (padded to 32)
    runner = _compare(str(tmp_path), "cpu", 64, capture=False)
    assert len(runner.prefill_graphs.layers) == 3  # one cut per attention layer


def test_prefills_larger_than_the_largest_count_run_eagerly(tmp_path):
    make_tiny_model("llama", tmp_path)
    runner = _compare(str(tmp_path), "cpu", 32, capture=False)  # the 39-token prefill falls back to eager
    assert runner.prefill_graphs.counts == [16, 32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_captured_pieces_match_eager_on_cuda(backend, tmp_path):
    make_tiny_model("qwen3", tmp_path)
    runner = _compare(str(tmp_path), "cuda", 64, capture=True, backend=backend)
    assert sorted(runner.prefill_graphs.pieces) == [16, 32, 64]
    assert all(len(p) == 4 for p in runner.prefill_graphs.pieces.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
def test_decode_graphs_write_their_logits_into_one_buffer(tmp_path):
    """Every captured decode batch size writes its logits into the largest graph's output, so the graph pool holds
    one logits buffer, not one per size (69 of them up to 1,024 rows did not fit); the replays equal eager."""
    from gridserve.model_executor.cuda_graph_runner import CudaGraphRunner

    make_tiny_model("qwen3", tmp_path)
    want = run_script(make_runner(str(tmp_path), device="cuda", attention_backend="triton"))
    runner = make_runner(str(tmp_path), device="cuda", attention_backend="triton")
    runner.graph_runner = CudaGraphRunner(runner, 8)
    largest = runner.graph_runner.outputs[8]
    for bs, out in runner.graph_runner.outputs.items():
        assert out.data_ptr() == largest.data_ptr() and out.shape[0] == bs
    for w, g in zip(want, run_script(runner), strict=True):  # the decode steps (3 rows) replay the 4-row graph
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_captures_run_with_the_garbage_collector_paused():
    """gc_paused collects once, keeps the collector off inside (a collection mid-capture can free another graph)
    and restores it, also when the capture raises; a collector already off stays off."""
    import gc

    from gridserve.model_executor.cuda_graph_runner import gc_paused

    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        raise RuntimeError("capture failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
