"""ModelRunner: owns the model, the KV cache pools, the attention backend and the sampler of one rank."""

import logging

import torch

from gridserve.attention.base import AttentionBackend
from gridserve.attention.torch_backend import TorchAttentionBackend
from gridserve.distributed.parallel_state import get_tp_group
from gridserve.mem_cache.memory_pool import KVCache, ReqToTokenPool, TokenToKVPoolAllocator
from gridserve.model_executor.forward_batch import ForwardBatch
from gridserve.model_loader.loader import load_model, resolve_dtype
from gridserve.models.config import ModelConfig
from gridserve.sampling.sampler import SampleOutput, Sampler, SamplingBatchInfo
from gridserve.server_args import ServerArgs

logger = logging.getLogger(__name__)

# On CPU the KV cache may take this share of the memory that is free at start.
_CPU_KV_MEMORY_SHARE = 0.25
_CPU_MAX_KV_TOKENS = 65536


def resolve_device(device: str, gpu_id: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device, gpu_id) if device == "cuda" else torch.device(device)


def make_attention_backend(name: str) -> AttentionBackend:
    if name == "triton":
        from gridserve.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    return TorchAttentionBackend()


def _cpu_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


class ModelRunner:
    def __init__(self, args: ServerArgs, model_path: str, cfg: ModelConfig, gpu_id: int = 0):
        self.args = args
        self.model_config = cfg
        self.device = resolve_device(args.device, gpu_id)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(args.dtype, cfg)
        self.context_len = args.context_length or cfg.max_position_embeddings
        self.model = load_model(model_path, cfg, self.dtype, self.device, args.load_format, args.show_progress)
        attn = self.model.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.tp = get_tp_group()
        # every TP rank holds the same tokens, so the pool is as large as the smallest rank allows
        self.max_total_num_tokens = self.tp.all_reduce_min(self._kv_capacity())
        self.max_running_requests = args.max_running_requests or max(
            1, min(self.max_total_num_tokens // 2, 2048 if self.device.type == "cuda" else 256))
        self.req_to_token_pool = ReqToTokenPool(self.max_running_requests, self.context_len + 1, self.device)
        self.allocator = TokenToKVPoolAllocator(self.max_total_num_tokens, self.device)
        self.kv_cache = KVCache(self.max_total_num_tokens, cfg.num_hidden_layers, self.num_kv_heads,
                                self.head_dim, self.dtype, self.device)
        self.attn_backend = make_attention_backend(args.attention_backend)
        self.sampler = Sampler()
        logger.info("KV cache: %d tokens, max running requests %d, context length %d",
                    self.max_total_num_tokens, self.max_running_requests, self.context_len)

    def _kv_capacity(self) -> int:
        if self.args.max_total_tokens:
            return self.args.max_total_tokens
        per_token = KVCache.bytes_per_token(self.model_config.num_hidden_layers, self.num_kv_heads,
                                            self.head_dim, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1 - self.args.mem_fraction_static)
            if budget <= 0:
                raise RuntimeError(f"no GPU memory left for the KV cache after loading weights "
                                   f"(free {free >> 20} MiB of {total >> 20} MiB); raise --mem-fraction-static")
            return int(budget // per_token)
        return int(min(_CPU_MAX_KV_TOKENS, _cpu_available_bytes() * _CPU_KV_MEMORY_SHARE // per_token))

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        fb.req_to_token = self.req_to_token_pool.req_to_token
        fb.kv_cache = self.kv_cache
        fb.attn_backend = self.attn_backend
        self.attn_backend.init_forward_metadata(fb)
        return self.model(fb.input_ids, fb.positions, fb)

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
