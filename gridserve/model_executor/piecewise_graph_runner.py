"""Prefill replayed from piecewise CUDA graphs.

An eager prefill of a few hundred tokens is host-bound: on an 8B model the GPU needs ~8 ms, but launching its
~500 kernels one by one takes the host ~20 ms, and that is most of a short prompt's time to first token. The
layers' work depends only on the number of tokens, except attention, whose grid depends on how the tokens
split into requests. So the forward is captured in pieces, cut at each attention: one graph runs from the
embedding (or one attention's output) up to the next attention's input, storing that layer's new K/V and
copying its queries into a static buffer; the attention itself runs eagerly between replays, reading the static
queries and writing a static output buffer that the next piece reads. A batch is padded up to the next
captured token count; the padded rows write their K/V to the padding slot 0 and no request reads them.

Each cut keeps only static buffers alive across pieces, so the graphs of one token count share one memory pool
the size of one layer's activations, and all counts share that pool (they never run at the same time).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time

import torch

from gridserve.distributed.pipeline import IntermediateTensors, first_rows
from gridserve.forward_batch import ForwardBatch, ForwardMode
from gridserve.model_executor.cuda_graph_runner import gc_paused

logger = logging.getLogger(__name__)


def capture_token_counts(max_tokens: int) -> list[int]:
    """Counts are at most 1.5x apart from 64 tokens up, so padding wastes at most a third of a batch (below 64
    tokens a prefill's time hardly depends on its size)."""
    counts = [16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096,
              5120, 6144, 8192, 10240, 12288, 16384]
    return sorted({c for c in counts if c < max_tokens} | {max_tokens})


class _CutAtAttention:
    """Stands in for the attention backend while pieces are captured (or, without capture, while a padded batch
    runs eagerly on CPU): stores K/V, copies the queries out and cuts the graph there."""

    def __init__(self, owner: PiecewiseGraphRunner):
        self.owner = owner
        self.layers: list = []  # the attention layers in the order the forward meets them

    def rotates_in_decode(self, fb: ForwardBatch) -> bool:
        return False  # prefill only: the layers rotate q and k themselves

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer, fb: ForwardBatch,
                rotation=None) -> torch.Tensor:
        o = self.owner
        o.backend.store_kv(k, v, layer, fb)
        n = q.shape[0]
        o.q[:n].copy_(q)
        self.layers.append(layer)
        o.cut(layer)
        return o.out[:n]


class PiecewiseGraphRunner:
    def __init__(self, runner, max_tokens: int, pool=None, capture: bool = True):
        """capture=False keeps the static buffers, the padding and the cuts but runs them eagerly (CPU tests)."""
        self.runner = runner
        self.backend = runner.attn_backend
        self.max_tokens = max_tokens
        self.counts = capture_token_counts(max_tokens)
        self.capture = capture
        dev, q_width = runner.device, runner.num_heads * runner.head_dim
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.out_cache_loc = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.q = torch.zeros(max_tokens, q_width, dtype=runner.dtype, device=dev)
        self.out = torch.zeros(max_tokens, q_width, dtype=runner.dtype, device=dev)
        # a pipeline stage after the first starts from the previous stage's hidden states and residual
        self.hidden_in = self.residual_in = None
        if not runner.pp.is_first:
            self.hidden_in = torch.zeros(max_tokens, runner.hidden_size, dtype=runner.dtype, device=dev)
            self.residual_in = torch.zeros_like(self.hidden_in)
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        # each count's output (the last piece's): final hidden states, or what the next pipeline stage needs
        self.hidden: dict[int, torch.Tensor | IntermediateTensors] = {}
        self.layers: list = []
        self._real: ForwardBatch | None = None  # the batch being run without capture
        self._graph: torch.cuda.CUDAGraph | None = None  # the piece being captured
        self._pieces: list[torch.cuda.CUDAGraph] = []
        self._pool = pool
        if capture:
            self._capture_all()

    # ---- capture --------------------------------------------------------------------------------
    def _static_batch(self, n: int) -> ForwardBatch:
        fb = ForwardBatch(forward_mode=ForwardMode.EXTEND, batch_size=1, input_ids=self.input_ids[:n],
                          positions=self.positions[:n], req_pool_indices=self.input_ids[:1],
                          seq_lens=self.input_ids[:1], out_cache_loc=self.out_cache_loc[:n], seq_lens_cpu=[n],
                          extend_seq_lens_cpu=[n])
        fb.kv_cache = self.runner.kv_cache
        return fb

    def _forward(self, n: int) -> torch.Tensor | IntermediateTensors:
        fb = self._static_batch(n)
        cutter = _CutAtAttention(self)
        fb.attn_backend = cutter
        intermediate = None
        if self.hidden_in is not None:
            intermediate = IntermediateTensors(self.hidden_in[:n], self.residual_in[:n])
        with torch.inference_mode():
            hidden = self.runner.model.hidden_states(fb.input_ids, fb.positions, fb, intermediate)
        self.layers = cutter.layers
        return hidden

    def _capture_all(self) -> None:
        start = time.perf_counter()
        stream = self.runner.stream
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        self.out_cache_loc.zero_()  # every captured row writes its K/V to the padding slot
        with gc_paused():
            for n in reversed(self.counts):  # largest first: the smaller ones fit in the memory it reserved
                self._capture(n, stream)
        torch.cuda.synchronize()
        logger.info("captured piecewise CUDA graphs for prefills of %d..%d tokens (%d counts, %d pieces each) "
                    "in %.1f s", self.counts[0], self.counts[-1], len(self.counts), len(self.layers) + 1,
                    time.perf_counter() - start)

    def _capture(self, n: int, stream) -> None:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(n)  # compile kernels and create cuBLAS handles outside the graphs
            stream.synchronize()
            self._pieces = []
            self._begin_piece()
            try:
                hidden = self._forward(n)
            except BaseException:
                self._abandon_piece()
                raise
            self._graph.capture_end()
            self._pieces.append(self._graph)
            self._graph = None
        torch.cuda.current_stream().wait_stream(stream)
        self.pieces[n], self.hidden[n] = self._pieces, hidden

    def _abandon_piece(self) -> None:
        """Ends the capture a failed forward left open; an open capture would fail every later CUDA call of the
        process (in the GPU tests, those of the tests after it)."""
        with contextlib.suppress(RuntimeError):  # ending an invalidated capture raises too
            self._graph.capture_end()
        self._graph = None

    def _begin_piece(self) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=self._pool)

    def cut(self, layer) -> None:
        """Called at each attention: ends the piece being captured and begins the next one, or, without
        capture, runs the attention of the real rows at once."""
        if self._graph is not None:
            self._graph.capture_end()
            self._pieces.append(self._graph)
            self._begin_piece()
        elif self._real is not None:
            self._attend(layer, self._real)

    def _attend(self, layer, fb: ForwardBatch) -> None:
        n = fb.input_ids.shape[0]
        self.backend.extend_attend(self.q[:n], layer, fb, out=self.out[:n])

    # ---- replay ---------------------------------------------------------------------------------
    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.forward_mode.is_extend() and 0 < fb.input_ids.shape[0] <= self.max_tokens

    def run(self, fb: ForwardBatch, intermediate: IntermediateTensors | None = None
            ) -> torch.Tensor | IntermediateTensors:
        """The final hidden states of the batch's new tokens (on a pipeline stage before the last, its hidden
        states and residual): views of static buffers on CUDA, valid until the next replay. fb must carry
        req_to_token and kv_cache, as for an eager forward."""
        n = fb.input_ids.shape[0]
        padded = self.counts[bisect.bisect_left(self.counts, n)]
        self.input_ids[:n].copy_(fb.input_ids)
        self.positions[:n].copy_(fb.positions)
        self.out_cache_loc[:n].copy_(fb.out_cache_loc)
        self.out_cache_loc[n:padded].zero_()  # padded rows must not overwrite a real slot
        if intermediate is not None:
            self.hidden_in[:n].copy_(intermediate.hidden)
            self.residual_in[:n].copy_(intermediate.residual)
        self.backend.init_forward_metadata(fb)
        if not self.capture:
            self._real = fb
            try:
                return first_rows(self._forward(padded), n)
            finally:
                self._real = None
        pieces = self.pieces[padded]
        for piece, layer in zip(pieces, self.layers, strict=False):
            piece.replay()
            self._attend(layer, fb)
        pieces[-1].replay()
        return first_rows(self.hidden[padded], n)

