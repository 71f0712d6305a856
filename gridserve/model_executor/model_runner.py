"""ModelRunner: owns the model, the KV cache pools, the attention backend, the CUDA graphs (whole decode
steps, prefill in pieces) and the sampler of one rank."""

import logging
import time

import torch

from gridserve import pdl
from gridserve.attention.registry import make_attention_backend
from gridserve.distributed.parallel_state import get_pp_group, get_tp_group, get_world_group
from gridserve.distributed.pipeline import BusyClock, IntermediateTensors
from gridserve.forward_batch import ForwardBatch
from gridserve.mem_cache.memory_pool import KVCache, ReqToTokenPool, TokenToKVPoolAllocator
from gridserve.model_executor.cuda_graph_runner import CudaGraphRunner
from gridserve.model_executor.memory import MemoryPlan, cpu_kv_capacity, measure_activation_peak
from gridserve.model_executor.piecewise_graph_runner import PiecewiseGraphRunner
from gridserve.model_loader.loader import load_model, resolve_dtype
from gridserve.models.config import ModelConfig
from gridserve.sampling.sampler import SampleOutput, Sampler, SamplingBatchInfo
from gridserve.server_args import ServerArgs

logger = logging.getLogger(__name__)


def resolve_device(device: str, gpu_id: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device, gpu_id) if device == "cuda" else torch.device(device)


class ModelRunner:
    def __init__(self, args: ServerArgs, model_path: str, cfg: ModelConfig, gpu_id: int = 0):
        self.args = args
        self.model_config = cfg
        self.device = resolve_device(args.device, gpu_id)
        self.stream = None
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # All of this rank's GPU work, graph captures included, runs on one stream of its own. Measured on
            # H100: graphs replayed on the legacy default stream took 150 us longer per decode step (1.35 ->
            # 1.51 ms, Qwen3-0.6B, batch 1) once any other stream had run work or captured a graph.
            self.stream = torch.cuda.Stream(self.device)
            torch.cuda.set_stream(self.stream)
        pdl.set_enabled(not args.disable_pdl)
        self.dtype = resolve_dtype(args.dtype, cfg)
        self.context_len = args.context_length or cfg.max_position_embeddings
        start = time.perf_counter()
        self.model = load_model(model_path, cfg, self.dtype, self.device, args.load_format, args.show_progress,
                                args.quantization)
        logger.info("weights loaded (%s) in %.1f s", args.load_format, time.perf_counter() - start)
        shape = self.model.attention_shape()
        self.start_layer, self.num_layers = shape.start_layer, shape.num_layers
        self.num_heads, self.num_kv_heads, self.head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.hidden_size = cfg.hidden_size
        self.tp, self.pp = get_tp_group(), get_pp_group()
        self._sends: list = []  # this stage's sends to the next one still in flight
        self.busy = BusyClock(self.device)  # this stage's time running its layers (pipeline parallelism)
        self.attn_backend = make_attention_backend(args.attention_backend, self.device,
                                                   cudnn_long_prefill=not args.disable_cudnn_prefill,
                                                   whole_chunk=args.prefill_token_budget)
        self.sampler = Sampler()
        # every rank holds the same tokens (for its heads and layers), so the pool is as large as the smallest
        # rank allows
        self.max_total_num_tokens = get_world_group().all_reduce_min(self._kv_capacity())
        self.max_running_requests = args.max_running_requests or max(
            1, min(self.max_total_num_tokens // 2, 2048 if self.device.type == "cuda" else 256))
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests, self.context_len + 1, self.device)
        self.allocator = TokenToKVPoolAllocator(self.max_total_num_tokens, self.device)
        self.kv_cache = KVCache(self.max_total_num_tokens, self.num_layers, self.num_kv_heads, self.head_dim,
                                self.dtype, self.device, self.start_layer)
        logger.info("KV cache: %d tokens, max running requests %d, context length %d",
                    self.max_total_num_tokens, self.max_running_requests, self.context_len)
        self.graph_runner = self._init_cuda_graphs()
        self.prefill_graphs = self._init_prefill_graphs()

    def _graph_max_bs(self) -> int:
        return min(self.args.cuda_graph_max_bs, self.max_running_requests)

    def _prefill_graph_tokens(self) -> int:
        """The largest prefill replayed from piecewise graphs; 0 when prefill runs eagerly."""
        a = self.args
        if self.device.type != "cuda" or a.disable_cuda_graph or a.disable_piecewise_cuda_graph:
            return 0
        if not self.attn_backend.supports_cuda_graph:
            return 0
        return min(a.piecewise_cuda_graph_max_tokens, a.prefill_token_budget)

    def _kv_capacity(self) -> int:
        per_token = KVCache.bytes_per_token(self.num_layers, self.num_kv_heads,
                                            self.head_dim, self.dtype)
        if self.args.max_total_tokens:
            return self.args.max_total_tokens
        if self.device.type != "cuda":
            tokens, why = cpu_kv_capacity(per_token)
            logger.info("KV cache of %d tokens: %s", tokens, why)
            return tokens
        prefill_tokens = self.args.prefill_token_budget
        peak = measure_activation_peak(self, prefill_tokens) + self.attn_backend.long_prefix_bytes(
            self.context_len, prefill_tokens, self.num_heads, self.num_kv_heads, self.head_dim, self.dtype)
        graph_bs = 0 if self.args.disable_cuda_graph else min(self.args.cuda_graph_max_bs,
                                                              self.args.max_running_requests or 1 << 30)
        plan = MemoryPlan.make(self.device, self.args.mem_fraction_static, peak, prefill_tokens, graph_bs,
                               self._prefill_graph_tokens(), self.model_config.vocab_size, per_token)
        logger.info("%s", plan.describe())
        return plan.kv_tokens

    def _init_cuda_graphs(self) -> CudaGraphRunner | None:
        if self.device.type != "cuda" or self.args.disable_cuda_graph:
            return None
        if not self.attn_backend.supports_cuda_graph:
            logger.warning("the %s attention backend cannot run in CUDA graphs: decode runs eagerly",
                           type(self.attn_backend).__name__)
            return None
        try:
            return CudaGraphRunner(self, self._graph_max_bs())
        except torch.OutOfMemoryError as e:
            raise ValueError(f"out of GPU memory while capturing CUDA graphs up to batch {self._graph_max_bs()}: "
                             f"lower --cuda-graph-max-bs or --mem-fraction-static "
                             f"(now {self.args.mem_fraction_static}), or pass --disable-cuda-graph") from e

    def _init_prefill_graphs(self) -> PiecewiseGraphRunner | None:
        tokens = self._prefill_graph_tokens()
        if not tokens:
            return None
        try:
            return PiecewiseGraphRunner(self, tokens)
        except torch.OutOfMemoryError as e:
            raise ValueError(f"out of GPU memory while capturing prefill CUDA graphs up to {tokens} tokens: lower "
                             f"--piecewise-cuda-graph-max-tokens or --mem-fraction-static "
                             f"(now {self.args.mem_fraction_static}), or pass --disable-piecewise-cuda-graph") from e

    def _attach(self, fb: ForwardBatch) -> None:
        fb.req_to_token = self.req_to_token_pool.req_to_token
        fb.kv_cache = self.kv_cache
        fb.attn_backend = self.attn_backend

    def forward_eager(self, fb: ForwardBatch, intermediate: IntermediateTensors | None = None):
        self._attach(fb)
        self.attn_backend.init_forward_metadata(fb)
        return self.model(fb.input_ids, fb.positions, fb, intermediate)

    def forward(self, fb: ForwardBatch, intermediate: IntermediateTensors | None = None):
        """Logits, or with pipeline parallelism on a stage before the last, what the next stage needs."""
        if self.graph_runner is not None and self.graph_runner.can_run(fb):
            return self.graph_runner.run(fb, intermediate)
        if self.prefill_graphs is not None and self.prefill_graphs.can_run(fb):
            self._attach(fb)
            out = self.prefill_graphs.run(fb, intermediate)
            return out if isinstance(out, IntermediateTensors) else self.model.compute_logits(out, fb)
        return self.forward_eager(fb, intermediate)

    def forward_stage(self, fb: ForwardBatch) -> torch.Tensor | None:
        """This pipeline stage's share of a forward: receives the previous stage's hidden states and residual,
        runs this stage's layers and sends the result on without waiting. The last stage returns the logits,
        the others None."""
        # A graph replay rewrites the buffers the previous send may still be reading: let it finish first.
        self.wait_sends()
        intermediate = None
        if not self.pp.is_first:
            n = fb.input_ids.shape[0]
            bufs = [torch.empty(n, self.hidden_size, dtype=self.dtype, device=self.device) for _ in range(2)]
            intermediate = IntermediateTensors(*self.pp.recv(bufs, self.pp.rank - 1))
        self.busy.start()  # after the receive: waiting for the previous stage is idle time
        out = self.forward(fb, intermediate)
        self.busy.stop()
        if not isinstance(out, IntermediateTensors):
            return out
        self._sends = self.pp.send([out.hidden, out.residual], self.pp.rank + 1)
        return None

    def wait_sends(self) -> None:
        """Waits until the next stage has what this stage sent (before reusing its buffers, or shutting down)."""
        for req in self._sends:
            req.wait()
        self._sends = []

    def sample(self, logits: torch.Tensor, info: SamplingBatchInfo, return_logprob: bool,
               top_logprobs_num: int) -> SampleOutput:
        out = self.sampler(logits, info, return_logprob, top_logprobs_num)
        # Every TP rank has the same gathered logits and the sampler is seed-deterministic, but float
        # reductions are not guaranteed bit-identical across ranks: take rank 0's tokens, so the KV caches
        # and the request states can never diverge.
        for t in (out.next_token_ids, out.logprobs, out.top_logprobs_val, out.top_logprobs_idx):
            if t is not None:
                self.tp.broadcast(t)
        return out
