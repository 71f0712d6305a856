"""The floor ("roofline") that `bench offline` and `bench latency` compare their results with.

Model, for a dense decoder run by an engine with continuous batching (first output token made by the prefill):
- Rates are measured on the device: memory bandwidth from a large device-to-device copy (bytes read + written),
  and the dense matmul rate in the model dtype. With --tp-size n they are multiplied by n (an ideal split).
- A forward step reads every weight once: all linear weights, the LM head, norms and biases; the embedding
  lookup reads only a few rows, so an untied embedding table is not counted.
- FLOPs per token: 2 * linear params (the LM head only for the last prompt token: prefill logits are computed
  for it alone) + attention 4 * layers * heads * head_dim * context (QK^T and PV).
- Every decode token reads its whole context's KV (prompt + tokens so far); KV writes (one per token) and
  activations are left out.
- Decode steps: a greedy schedule of the output lengths over at most max_running_requests slots (sequences are
  taken in order, each holds a slot for output_len - 1 steps), i.e. max(output_len) - 1 when all fit; KV
  capacity and the prefill/decode interleaving are ignored. Prefill steps: ceil(prompt tokens / prefill budget).
- Offline floor = memory time (weights per step + KV reads, over bandwidth) + compute time (all FLOPs over the
  matmul rate). The sum is what the requirement asks for; max() of the two would be the strict roofline, so
  both terms are reported separately.
- Latency floor at batch 1: TPOT = (weights + KV of the mean decode context) / bandwidth; TTFT = prefill FLOPs
  / matmul rate + one weight read / bandwidth.
"""

import heapq
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from gridserve.models.config import ModelConfig


@dataclass(frozen=True)
class DeviceRates:
    mem_bw: float  # bytes / s, read + written
    matmul_flops: float  # FLOP / s, dense matmul in `dtype`
    device: str = ""
    dtype: str = ""

    def scaled(self, n: int) -> "DeviceRates":
        """n identical devices splitting the work perfectly (tensor parallelism, as a floor)."""
        return DeviceRates(self.mem_bw * n, self.matmul_flops * n, f"{n} x {self.device}" if n > 1 else self.device,
                           self.dtype)

    def describe(self) -> str:
        return f"{self.mem_bw / 1e9:.1f} GB/s memory, {self.matmul_flops / 1e12:.3f} TFLOP/s {self.dtype} matmul"


# printed when a result beats its floor: the rates must have been measured low
ABOVE_FLOOR_NOTE = "  note: above 100% of the floor means the device measured slower than it ran (a busy machine?)"


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(getattr(torch, device.type, None), "synchronize"):
        getattr(torch, device.type).synchronize()  # mps, xpu, ...: kernels run asynchronously there too


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync_device(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":  # events time the kernel itself, not the launch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            sync_device(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes` random bytes."""
    src = torch.rand(nbytes // 4, device=device)  # random, so no compression/zero shortcut helps
    dst = torch.empty_like(src)
    t = _median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * src.nbytes / t


def measure_matmul(device: torch.device, dtype: torch.dtype, n: int | None, repeats: int,
                   target_s: float = 0.05) -> tuple[float, int]:
    """(FLOP/s, n) of an n x n x n matmul; n=None sizes it so one matmul takes about `target_s` (CPU)."""
    if n is None:
        # CPU rates differ 100x between dtypes (no bf16 units): time one 512^3, then scale n to the target. Not
        # below 256: smaller ones measure thread start-up, not the rate (50x low on a busy 2-core machine)
        probe = 512
        x = torch.randn(probe, probe, dtype=dtype, device=device)
        t = _median_seconds(lambda: x @ x, device, 1, warmup=1)
        n = min(max(int(probe * (target_s / max(t, 1e-9)) ** (1 / 3)) // 64 * 64, 256), 2048)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    t = _median_seconds(lambda: torch.matmul(a, b, out=out), device, repeats)
    return 2 * n**3 / t, n


def measure_device(device: torch.device | str, dtype: torch.dtype | None = None) -> DeviceRates:
    """Measured bandwidth and matmul rate: about 0.1 s on an H100, under 1 s on a CPU."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    if gpu:
        with torch.cuda.device(device):
            bw = measure_bandwidth(device, 1 << 30, repeats=10)  # 1 GiB: far beyond L2
            flops, _ = measure_matmul(device, dtype, 8192, repeats=10)
            torch.cuda.empty_cache()
        name = torch.cuda.get_device_name(device)
    else:
        bw = measure_bandwidth(device, 64 << 20, repeats=5)  # 64 MiB: beyond the last-level cache
        flops, _ = measure_matmul(device, dtype, None, repeats=5)
        name = str(device)
    return DeviceRates(bw, flops, name, str(dtype).removeprefix("torch."))


def measure_for(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp_size: int = 1,
                quantization: str | None = None) -> tuple["ModelCost", DeviceRates]:
    """The model's costs in `dtype` (its linear layers in FP8 with `quantization` 'fp8' or an FP8 checkpoint) and
    the device's measured rates, times tp_size (the bench commands' helper). The FLOP rate stays `dtype`'s: for FP8
    the TTFT floor is then too high, the bytes (and TPOT floor) are right."""
    from gridserve.layers.quantization import effective_quantization

    fp8 = effective_quantization(quantization, cfg.hf_config) == "fp8"
    return ModelCost.from_config(cfg, dtype.itemsize, fp8), measure_device(device, dtype).scaled(tp_size)


@dataclass(frozen=True)
class ModelCost:
    """Per-step bytes and per-token FLOPs of a decoder, from its shapes. With experts, a token runs top_k of
    each sparse layer's experts (FLOPs), and a step reads the experts its tokens are routed to (bytes)."""

    linear_params: int  # matmul weights one token runs through: attention, MLPs (routed experts only), LM head
    lm_head_params: int
    other_params: int  # norms and biases: read every step, no matmul FLOPs
    num_layers: int
    num_heads: int
    head_dim: int
    kv_bytes_per_token: int
    dtype_bytes: int
    expert_params: int = 0  # one expert's gate, up and down
    sparse_layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    fp8_params: int = 0  # of the dense linear weights, those stored in one byte (--quantization fp8)
    fp8_experts: bool = False  # the routed experts in one byte too

    @classmethod
    def from_config(cls, cfg: ModelConfig, dtype_bytes: int, fp8: bool = False) -> "ModelCost":
        """fp8: the attention, dense MLP and expert weights in one byte; the LM head and the router stay in
        `dtype_bytes`, as layers/quantization.py leaves them."""
        h, d, layers = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
        q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h
        lm_head = cfg.vocab_size * h
        norms = 2 * h + (2 * d if cfg.qk_norm else 0)
        bias = q + 2 * kv if cfg.attention_bias else 0
        moe, mlp, expert, dense = cfg.moe, 0, 0, layers * attn
        for i in range(layers):
            if moe is None or i not in moe.sparse_layers:
                mlp += 3 * h * cfg.intermediate_size
                dense += 3 * h * cfg.intermediate_size
            else:  # the router, top_k experts and the shared expert
                expert = 3 * h * moe.intermediate_size
                mlp += moe.num_experts * h + moe.top_k * expert + 3 * h * moe.shared_expert_intermediate_size
                dense += 3 * h * moe.shared_expert_intermediate_size
        sparse = len(moe.sparse_layers) if moe else 0
        return cls(linear_params=layers * attn + mlp + lm_head, lm_head_params=lm_head,
                   other_params=layers * (norms + bias) + h, num_layers=layers, num_heads=cfg.num_attention_heads,
                   head_dim=d, kv_bytes_per_token=2 * layers * kv * dtype_bytes, dtype_bytes=dtype_bytes,
                   expert_params=expert, sparse_layers=sparse, num_experts=moe.num_experts if moe else 0,
                   top_k=moe.top_k if moe else 0, fp8_params=dense if fp8 else 0, fp8_experts=fp8)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight: what a step reads once its tokens reach every expert (tied or not, the LM head
        is read once; embedding rows are negligible)."""
        return self.weight_bytes_at(None)

    def weight_bytes_at(self, tokens: int | None) -> int:
        """Bytes a step of `tokens` tokens reads: the dense weights, and in each sparse layer the experts its
        tokens reach, E * (1 - (1 - k/E)^tokens) of them under uniform routing (exactly k for one token);
        None: all of them."""
        params, one_byte = self.linear_params + self.other_params, self.fp8_params
        if self.sparse_layers:
            routed = self.top_k if tokens == 1 else self.num_experts if tokens is None else \
                self.num_experts * (1 - (1 - self.top_k / self.num_experts) ** tokens)
            params += round(self.sparse_layers * (routed - self.top_k) * self.expert_params)
            if self.fp8_experts:
                one_byte += round(self.sparse_layers * routed * self.expert_params)
        return (params - one_byte) * self.dtype_bytes + one_byte

    def attention_flops(self, keys: int) -> int:
        """QK^T and PV for one query token attending to `keys` tokens, all layers."""
        return 4 * self.num_layers * self.num_heads * self.head_dim * keys

    def prefill_flops(self, prompt_len: int) -> int:
        """One request's prefill: causal attention, logits for the last token only."""
        body = 2 * (self.linear_params - self.lm_head_params) * prompt_len + 2 * self.lm_head_params
        return body + self.attention_flops(prompt_len * (prompt_len + 1) // 2)

    def decode_flops(self, prompt_len: int, steps: int) -> int:
        """`steps` decode tokens after a prompt: step k attends to prompt_len + k keys."""
        return 2 * self.linear_params * steps + self.attention_flops(_context_sum(prompt_len, steps))

    def decode_kv_bytes(self, prompt_len: int, steps: int) -> int:
        return self.kv_bytes_per_token * _context_sum(prompt_len, steps)


def _context_sum(prompt_len: int, steps: int) -> int:
    """sum over k = 1..steps of (prompt_len + k)."""
    return steps * prompt_len + steps * (steps + 1) // 2


def decode_steps(output_lens: Sequence[int], max_running_requests: int) -> int:
    """Decode forward passes of a greedy continuous-batching schedule: each sequence, in order, takes the first
    free slot and holds it for output_len - 1 steps (the prefill makes its first token)."""
    free_at = [0] * max(1, min(max_running_requests, len(output_lens)))
    end = 0
    for n in output_lens:
        if n > 1:
            finish = heapq.heappop(free_at) + n - 1
            heapq.heappush(free_at, finish)
            end = max(end, finish)
    return end


@dataclass(frozen=True)
class OfflineFloor:
    decode_steps: int
    prefill_steps: int
    weight_bytes: int  # weights read, all steps
    kv_bytes: int  # KV read by decode tokens
    flops: int
    memory_s: float
    compute_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def floor_s(self) -> float:
        return self.memory_s + self.compute_s

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.floor_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.floor_s

    def fraction(self, wall_s: float) -> float:
        """Share of the floor achieved: floor time / measured time (1.0 = at the floor)."""
        return self.floor_s / wall_s

    def as_dict(self) -> dict:
        return {**asdict(self), "floor_s": self.floor_s, "output_tok_s": self.output_tok_s,
                "total_tok_s": self.total_tok_s}


def offline_floor(cost: ModelCost, prompt_lens: Sequence[int], output_lens: Sequence[int], rates: DeviceRates,
                  max_running_requests: int, prefill_tokens_per_step: int) -> OfflineFloor:
    d_steps = decode_steps(output_lens, max_running_requests)
    p_steps = math.ceil(sum(prompt_lens) / prefill_tokens_per_step)
    weight_bytes = (d_steps + p_steps) * cost.weight_bytes
    kv = flops = 0
    for p, n in zip(prompt_lens, output_lens, strict=True):
        kv += cost.decode_kv_bytes(p, n - 1)
        flops += cost.prefill_flops(p) + cost.decode_flops(p, n - 1)
    return OfflineFloor(d_steps, p_steps, weight_bytes, kv, flops, (weight_bytes + kv) / rates.mem_bw,
                        flops / rates.matmul_flops, sum(prompt_lens), sum(output_lens))


@dataclass(frozen=True)
class LatencyFloor:
    tpot_s: float
    ttft_s: float
    weight_bytes: int  # per step
    kv_bytes: float  # per decode step, at the mean context


def latency_floor(cost: ModelCost, input_len: int, output_len: int, rates: DeviceRates,
                  batch_size: int = 1) -> LatencyFloor:
    """A batch of batch_size prompts prefilled together, then decoded in lockstep."""
    # decode step k = 1..output_len-1 reads input_len + k tokens of KV: the mean is input_len + output_len / 2
    kv = batch_size * cost.kv_bytes_per_token * (input_len + output_len / 2)
    step_bytes = cost.weight_bytes_at(batch_size)  # a token a request: at batch 1 the routed experts only
    tpot = (step_bytes + kv) / rates.mem_bw
    ttft = (batch_size * cost.prefill_flops(input_len) / rates.matmul_flops
            + cost.weight_bytes_at(batch_size * input_len) / rates.mem_bw)
    return LatencyFloor(tpot, ttft, step_bytes, kv)
