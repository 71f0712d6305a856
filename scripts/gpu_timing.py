"""GPU timing for the benchmark scripts (imported from the scripts folder, which Python puts first on the path)."""

import torch


def time_ms(fn, graph: bool, iters: int = 30) -> float:
    """Milliseconds per call of fn, by CUDA events, after one warm-up call; graph: fn captured once and replayed
    (no launch gaps: what a captured decode step sees)."""
    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
