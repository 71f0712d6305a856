"""A model-parallel rank for tests: joins a gloo group (tp x pp), runs the logits script, and the rank that holds
the logits (tp 0 of the last stage) saves them."""

import os

import torch

from gridserve.distributed.parallel_state import destroy_model_parallel, get_pp_group, init_model_parallel
from gridserve.distributed.ranks import Layout


def logits_worker(rank: int, tp: int, store_addr: str, model_path: str, result_path: str,
                  load_format: str = "auto", pp: int = 1, partition: list[int] | None = None,
                  graphs: bool = False, ep: int = 1, quantization: str | None = None) -> None:
    """graphs: decode through the CUDA-graph runner's static buffers and padding, run eagerly on CPU (Triton
    attention under the interpreter)."""
    torch.set_num_threads(1)
    if graphs:
        os.environ["TRITON_INTERPRET"] = "1"
    init_model_parallel(Layout(tp, pp).rank(rank), store_addr, torch.device("cpu"), pp_layer_partition=partition,
                        ep_size=ep)
    from tests.logits_script import make_runner, run_script

    runner = make_runner(model_path, tp, load_format, attention_backend="triton" if graphs else "torch", ep_size=ep,
                         quantization=quantization)
    if graphs:
        from gridserve.model_executor.cuda_graph_runner import CudaGraphRunner
        from gridserve.model_executor.piecewise_graph_runner import PiecewiseGraphRunner

        runner.graph_runner = CudaGraphRunner(runner, 4, capture=False)
        runner.prefill_graphs = PiecewiseGraphRunner(runner, 64, capture=False)
    if pp > 1:  # this stage holds only its layers and their KV cache
        assert runner.num_layers < len(runner.model.model.layers) == runner.model_config.num_hidden_layers
        assert len(runner.kv_cache.k_buffers) == runner.num_layers
    out = run_script(runner)
    runner.wait_sends()
    if rank == (pp - 1) * tp:
        assert get_pp_group().is_last
        torch.save(out, result_path)
    destroy_model_parallel()
