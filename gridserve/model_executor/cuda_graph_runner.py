"""Decode steps replayed from captured CUDA graphs.

A decode step of a small model is hundreds of kernel launches that each take the GPU microseconds: the host
cannot issue them as fast as the GPU runs them. Capturing the whole decode forward (layers, LM head) once per
batch size and replaying it costs one launch. A pipeline stage captures its own layers, with the previous
stage's hidden states and residual in static buffers too. Inputs live in static buffers that each step copies into; a
batch is padded up to the next captured size with rows that read no KV (seq_len 0) and write their K/V to the
padding slot 0, so they cannot disturb real rows. Prefill has its own runner (piecewise_graph_runner.py).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import time
from collections.abc import Iterator

import torch

from gridserve.distributed.pipeline import IntermediateTensors, first_rows
from gridserve.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's garbage collector stays off while graphs are captured (one collection first, so none is due).
    A collection in the middle of a capture can free objects in reference cycles, such as an earlier runner's
    graphs and their memory; a free that synchronises is forbidden while a stream captures, and the capture is then
    invalidated ("operation failed due to a previous error during capture", seen once in the GPU tests)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64 and every 16 beyond. Each graph costs ~60 ms of start-up (35 of them took
    2.1 s on an H100); above 64 rows a decode step still reads the weights once, whatever its rows, so padding up
    to 15 rows there costs next to nothing (padded rows read no KV)."""
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, max_bs + 16, 16)]
    return sorted({s for s in sizes if s < max_bs} | {max_bs})


class CudaGraphRunner:
    def __init__(self, runner, max_bs: int, capture: bool = True):
        """capture=False keeps the static buffers and the padding but runs them eagerly (tests on CPU)."""
        self.runner = runner
        self.sizes = capture_batch_sizes(max_bs)
        self.max_bs = max_bs
        dev = runner.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.req_pool_indices = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        # a pipeline stage after the first starts from the previous stage's hidden states and residual
        self.hidden_in = self.residual_in = None
        if not runner.pp.is_first:
            self.hidden_in = torch.zeros(max_bs, runner.hidden_size, dtype=runner.dtype, device=dev)
            self.residual_in = torch.zeros_like(self.hidden_in)
        runner.attn_backend.init_cuda_graph_state(max_bs, runner.num_heads, runner.head_dim, dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None  # the memory pool of the first (largest) graph, shared by the rest
        self.outputs: dict[int, torch.Tensor | IntermediateTensors] = {}
        if capture:
            self._capture_all()

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=self.input_ids[:bs],
            positions=self.positions[:bs], req_pool_indices=self.req_pool_indices[:bs], seq_lens=self.seq_lens[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            seq_lens_cpu=[0] * bs,  # not read by graph-capable backends: replays cannot see host values
        )

    def _static_intermediate(self, bs: int) -> IntermediateTensors | None:
        return None if self.hidden_in is None else IntermediateTensors(self.hidden_in[:bs], self.residual_in[:bs])

    def _capture_all(self) -> None:
        start = time.perf_counter()
        stream = self.runner.stream
        # Largest first: the smaller graphs then fit in the memory the largest one reserved in the shared pool, and
        # write their logits into its output (an output of each would stay allocated: the sum over 69 sizes up to
        # 1,024 rows of a 152k vocabulary is tens of GB).
        largest = None
        with gc_paused():
            for bs in reversed(self.sizes):
                largest = self._capture(bs, largest, stream)
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s in %.1f s", self._sizes_text(),
                    time.perf_counter() - start)

    def _capture(self, bs: int, largest: torch.Tensor | None, stream) -> torch.Tensor:
        """Captures one batch size; returns the largest graph's logits (this one's, when it is the first)."""
        fb = self._static_batch(bs)
        if isinstance(largest, torch.Tensor):
            fb.logits_out = largest[:bs]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.runner.forward_eager(fb, self._static_intermediate(bs))  # compile kernels, outside the graph
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                out = self.runner.forward_eager(fb, self._static_intermediate(bs))
        torch.cuda.current_stream().wait_stream(stream)
        self._pool = graph.pool()
        self.graphs[bs], self.outputs[bs] = graph, out
        return out if largest is None else largest

    def _sizes_text(self) -> str:
        s = self.sizes
        return ", ".join(map(str, s)) if len(s) <= 6 else f"{s[0]}, {s[1]}, {s[2]} ... {s[-1]} ({len(s)} graphs)"

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.forward_mode.is_decode() and fb.batch_size <= self.max_bs and not fb.return_all_logits

    def run(self, fb: ForwardBatch, intermediate: IntermediateTensors | None = None
            ) -> torch.Tensor | IntermediateTensors:
        """Logits of the batch's rows (or, on a pipeline stage before the last, its hidden states and residual).
        On CUDA they are views of the graph's output buffers, valid until the next replay (stream order makes any
        kernel queued before it see these values)."""
        bs = fb.batch_size
        padded = self.sizes[bisect.bisect_left(self.sizes, bs)]
        self.input_ids[:bs].copy_(fb.input_ids)
        self.positions[:bs].copy_(fb.positions)
        self.req_pool_indices[:bs].copy_(fb.req_pool_indices)
        self.seq_lens[:bs].copy_(fb.seq_lens)
        self.out_cache_loc[:bs].copy_(fb.out_cache_loc)
        if intermediate is not None:
            self.hidden_in[:bs].copy_(intermediate.hidden)
            self.residual_in[:bs].copy_(intermediate.residual)
        if padded > bs:  # stale ids and rows of earlier batches are valid indices; lengths and slots are not
            self.seq_lens[bs:padded].zero_()
            self.out_cache_loc[bs:padded].zero_()
        graph = self.graphs.get(padded)
        if graph is None:
            out = self.runner.forward_eager(self._static_batch(padded), self._static_intermediate(padded))
        else:
            graph.replay()
            out = self.outputs[padded]
        return first_rows(out, bs)
