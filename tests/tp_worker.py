"""A tensor-parallel rank for tests: joins a gloo group, runs the logits script, rank 0 saves the result."""

import torch

from gridserve.distributed.parallel_state import destroy_model_parallel, init_model_parallel


def logits_worker(rank: int, tp: int, init_method: str, model_path: str, result_path: str,
                  load_format: str = "auto") -> None:
    torch.set_num_threads(1)
    init_model_parallel(tp, rank, tp, 1, init_method, torch.device("cpu"))
    from tests.logits_script import make_runner, run_script

    out = run_script(make_runner(model_path, tp, load_format))
    if rank == 0:
        torch.save(out, result_path)
    destroy_model_parallel()
