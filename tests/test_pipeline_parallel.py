"""Pipeline parallelism on CPU (gloo, float32): each stage holds only its layers (and their KV cache), hands its
hidden states and residual to the next, and the last stage's logits equal one process's, alone and combined with
tensor parallelism; the layer partition and its errors; the clock of a stage's busy time."""

import time

import pytest
import torch
import torch.multiprocessing as mp

from gridserve.distributed.pipeline import BusyClock, partition_layers
from gridserve.server_args import ServerArgs
from tests.logits_script import make_runner, run_script
from tests.server_utils import free_port
from tests.tiny_models import make_tiny_model
from tests.tp_worker import logits_worker


def test_partition_puts_the_remainder_on_the_last_stages():
    assert partition_layers(30, 4) == [(0, 7), (7, 14), (14, 22), (22, 30)]
    assert partition_layers(3, 2) == [(0, 1), (1, 3)]
    assert partition_layers(4, 1) == [(0, 4)]
    assert partition_layers(3, 2, [2, 1]) == [(0, 2), (2, 3)]
    with pytest.raises(ValueError, match="larger than the model's 3 layers"):
        partition_layers(3, 4)
    with pytest.raises(ValueError, match="sum to the model's 3 layers"):
        partition_layers(3, 2, [1, 1])
    with pytest.raises(ValueError, match="must be 2 positive layer counts"):
        ServerArgs(pp_size=2, pp_layer_partition="3")
    assert ServerArgs(pp_size=2, pp_layer_partition="2,1").pp_partition == [2, 1]


@pytest.mark.parametrize("kind, tp, pp, partition, load_format", [
    ("llama", 1, 2, None, "auto"),  # 3 layers: 1 + 2
    ("qwen3", 1, 2, [2, 1], "auto"),
    ("qwen2", 1, 3, None, "auto"),  # tied embeddings: the last stage loads the head from the embedding
    ("llama3-rope", 2, 2, None, "auto"),  # 4 processes, one KV head replicated over tp
    ("qwen2", 1, 2, None, "dummy"),
    # the layouts of the 4- and 8-GPU runs (issue 8): tp 8, tp 4 x pp 2, pp 4, tp 2 x pp 2
    ("llama-8h", 8, 1, None, "auto"), ("llama-8h", 4, 2, None, "auto"), ("llama-8h", 1, 4, None, "auto"),
    ("llama-8h", 2, 2, [3, 1], "auto"),
])
def test_parallel_logits_equal_one_process(kind, tp, pp, partition, load_format, tmp_path):
    make_tiny_model(kind, tmp_path / "model")
    want = run_script(make_runner(str(tmp_path / "model"), 1, load_format))
    result = tmp_path / "pp.pt"
    mp.start_processes(logits_worker, args=(tp, f"127.0.0.1:{free_port()}", str(tmp_path / "model"),
                                            str(result), load_format, pp, partition),
                       nprocs=tp * pp, start_method="spawn")
    _assert_same(torch.load(result), want)


@pytest.mark.parametrize("graphs", [False, True])
def test_moe_over_tp2_ep2_pp2_equals_one_process(graphs, tmp_path):
    """Qwen3-MoE (a dense middle layer between two sparse ones) on 4 ranks, each holding half the experts of its
    stage; with graphs, through the graph runners' static buffers (eagerly, on CPU)."""
    make_tiny_model("qwen3-moe", tmp_path / "model")
    want = run_script(make_runner(str(tmp_path / "model"), 1))
    result = tmp_path / "pp.pt"
    mp.start_processes(logits_worker, args=(2, f"127.0.0.1:{free_port()}", str(tmp_path / "model"),
                                            str(result), "auto", 2, None, graphs, 2),
                       nprocs=4, start_method="spawn")
    _assert_same(torch.load(result), want)


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 2)])
def test_stages_run_through_the_graph_runners_buffers(tp, pp, tmp_path):
    """Each stage's decode goes through the CUDA-graph runner (static inputs, the previous stage's hidden
    states and residual in static buffers, batch 3 padded to 4) and its prefill through the piecewise runner
    (39 and 23 tokens padded to 64 and 32, cut at each attention), run eagerly on CPU."""
    make_tiny_model("llama-8h", tmp_path / "model")
    want = run_script(make_runner(str(tmp_path / "model"), 1))
    result = tmp_path / "pp.pt"
    mp.start_processes(logits_worker, args=(tp, f"127.0.0.1:{free_port()}", str(tmp_path / "model"),
                                            str(result), "auto", pp, None, True),
                       nprocs=tp * pp, start_method="spawn")
    _assert_same(torch.load(result), want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA events"))])
def test_busy_clock_counts_device_work_only(device):
    clock, x = BusyClock(torch.device(device)), torch.randn(256, 256, device=device)

    def work():
        clock.start()
        y = x
        for _ in range(50):
            y = torch.tanh(y @ x)
        clock.stop()

    work()
    if device == "cuda":
        torch.cuda.synchronize()
    busy = clock.busy_s()
    assert busy > 0
    time.sleep(0.1)  # idle time between forwards is not busy time
    assert clock.busy_s() == busy
    t0 = time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    assert 0 < clock.busy_s() - busy <= time.perf_counter() - t0
