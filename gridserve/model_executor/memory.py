"""How many KV-cache tokens a rank can hold.

On CUDA, `--mem-fraction-static` is the share of the GPU that weights plus the KV cache may take (SGLang's
meaning). What is left must hold the largest transient: the activations of the biggest prefill, measured by
running one after the weights are loaded, and the CUDA graphs' pool (decode activations and logits at the
largest captured batch). The KV cache gets the smaller of the two limits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gridserve.distributed.pipeline import IntermediateTensors
from gridserve.forward_batch import ForwardBatch, ForwardMode
from gridserve.mem_cache.memory_pool import KVCache

GiB = 1 << 30
# On CPU the KV cache takes at most CPU_KV_BYTES and a quarter of the memory free at start: CPU serving runs few
# requests at once, and a bigger pool only costs seconds of start-up zeroing it (65,536 tokens of SmolLM2-135M
# were 3 GB and 9 s).
CPU_KV_BYTES = 1 * GiB
_CPU_KV_MEMORY_SHARE = 0.25
_MIN_KV_TOKENS = 256
_SAFETY_BYTES = 512 << 20  # allocator fragmentation, NCCL and cuBLAS workspaces


def cpu_kv_capacity(bytes_per_token: int) -> tuple[int, str]:
    """KV-cache tokens for a CPU rank by default, and the reason for the start-up line."""
    available = 8 * GiB
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    budget = min(CPU_KV_BYTES, int(available * _CPU_KV_MEMORY_SHARE))
    tokens = max(_MIN_KV_TOKENS, budget // bytes_per_token)
    why = (f"{tokens * bytes_per_token / GiB:.2f} GiB at {bytes_per_token} bytes a token: the CPU default, the "
           f"smaller of {CPU_KV_BYTES / GiB:.0f} GiB and a quarter of the {available / GiB:.1f} GiB free; "
           "--max-total-tokens sets it")
    return tokens, why


def measure_activation_peak(runner, num_tokens: int) -> int:
    """Bytes a prefill of num_tokens new tokens allocates beyond the weights (forward and logits), measured on
    a throw-away KV cache just large enough for it."""
    dev, cfg = runner.device, runner.model_config
    per_req = min(num_tokens, runner.context_len)
    lens = [per_req] * (num_tokens // per_req) + ([num_tokens % per_req] if num_tokens % per_req else [])
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    kv = KVCache(num_tokens, runner.num_layers, runner.num_kv_heads, runner.head_dim, runner.dtype, dev,
                 runner.start_layer)
    slots = torch.arange(1, num_tokens + 1, device=dev)
    table = torch.zeros(len(lens), per_req, dtype=torch.int32, device=dev)
    for i, part in enumerate(slots.split(lens)):
        table[i, : len(part)] = part.to(torch.int32)
    base = torch.cuda.memory_allocated(dev)
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND, batch_size=len(lens),
        input_ids=torch.randint(0, cfg.vocab_size, (num_tokens,), device=dev),
        positions=torch.cat([torch.arange(n, device=dev) for n in lens]),
        req_pool_indices=torch.arange(len(lens), device=dev), seq_lens=torch.tensor(lens, device=dev),
        out_cache_loc=slots, seq_lens_cpu=lens, extend_seq_lens_cpu=lens)
    fb.req_to_token, fb.kv_cache, fb.attn_backend = table, kv, runner.attn_backend
    runner.attn_backend.init_forward_metadata(fb)
    intermediate = None
    if not runner.pp.is_first:  # a later pipeline stage starts from the previous stage's hidden states
        hidden = torch.zeros(num_tokens, runner.hidden_size, dtype=runner.dtype, device=dev)
        intermediate = IntermediateTensors(hidden, hidden.clone())
    logits = runner.model(fb.input_ids, fb.positions, fb, intermediate)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    del logits, fb, kv, table, slots
    torch.cuda.empty_cache()
    return peak


@dataclass
class MemoryPlan:
    total: int
    used_before_kv: int  # weights, CUDA context and anything else resident
    activation_peak: int
    prefill_tokens: int
    graph_reserve: int
    kv_bytes: int
    kv_tokens: int

    @classmethod
    def make(cls, device: torch.device, mem_fraction_static: float, activation_peak: int, prefill_tokens: int,
             graph_max_bs: int, prefill_graph_tokens: int, vocab_size: int, bytes_per_token: int) -> MemoryPlan:
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        # The decode graphs' pool holds decode activations and the logits at the largest batch (one buffer that
        # every size writes into), and the sampler's float copy and temporaries come on top; decode activations are
        # tiny next to a prefill's, so the logits terms dominate (12 bytes a logit: generous). The
        # prefill pieces' pool holds the activations of their largest token count (scaled from the measured peak;
        # it overestimates, as the measured peak includes the logits).
        graph_reserve = graph_max_bs * vocab_size * 4 * 3
        graph_reserve += int(activation_peak * min(1.0, prefill_graph_tokens / prefill_tokens))
        static_room = int(total * mem_fraction_static) - used
        transient_room = free - activation_peak - graph_reserve - _SAFETY_BYTES
        kv_bytes = min(static_room, transient_room)
        plan = cls(total, used, activation_peak, prefill_tokens, graph_reserve, kv_bytes,
                   max(0, kv_bytes // bytes_per_token))
        if plan.kv_tokens < _MIN_KV_TOKENS:
            raise ValueError(plan.shortage_message(mem_fraction_static, bytes_per_token,
                                                   static_room <= transient_room))
        return plan

    def shortage_message(self, frac: float, bytes_per_token: int, static_bound: bool) -> str:
        need = _MIN_KV_TOKENS * bytes_per_token
        head = (f"not enough GPU memory for a KV cache of {_MIN_KV_TOKENS} tokens: {self.describe()}. ")
        if static_bound:
            want = (self.used_before_kv + need) / self.total
            if want < 0.98:
                return head + f"Raise --mem-fraction-static from {frac} to at least {want:.2f}."
            return head + "The weights nearly fill the GPU: use --tp-size to split them over more GPUs."
        return head + (f"Lower --mem-fraction-static below {frac}, --chunked-prefill-size / --max-prefill-tokens "
                       f"(a prefill of {self.prefill_tokens} tokens needs {self.activation_peak / GiB:.2f} GiB), "
                       f"--cuda-graph-max-bs or --piecewise-cuda-graph-max-tokens.")

    def describe(self) -> str:
        return (f"GPU memory {self.total / GiB:.1f} GiB: weights and runtime {self.used_before_kv / GiB:.2f} GiB, "
                f"prefill activations {self.activation_peak / GiB:.2f} GiB ({self.prefill_tokens} tokens), "
                f"CUDA graphs ~{self.graph_reserve / GiB:.2f} GiB, KV cache {max(self.kv_bytes, 0) / GiB:.2f} GiB "
                f"= {self.kv_tokens} tokens")
