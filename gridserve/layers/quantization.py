"""FP8 weights (`--quantization fp8`, the name SGLang and vLLM use): W8A8 with float8_e4m3fn.

Weights get one scale per output channel (row), activations one per token, computed on the fly; on CUDA the product
runs in `torch._scaled_mm`, which applies both scales and writes the activations' dtype (elsewhere the same
arithmetic in float32, the reference the GPU tests compare it with). A decode batch of up to DECODE_GEMM_MAX_M tokens
skips the activations' quantization on CUDA (layers/linear.apply_linear): one Triton kernel reads the FP8 weights and
widens them in registers (W8A16), since at that size the weights' bytes are the whole cost. A bf16/fp16 checkpoint is
quantized once after loading ("online"); a checkpoint already in FP8 (HF `quantization_config.quant_method:
fp8`, blocks of 128 x 128 with `weight_scale_inv`) is dequantized block by block as it loads, then quantized
per channel the same way (a second rounding, within FP8's own error; a block-scaled GEMM would keep the
checkpoint's scales exactly).

What stays in the activations' dtype: the embeddings and the LM head (their error reaches every logit) and the
MoE router (it picks experts). The experts are FP8 too, with a scale per (expert, row), read by the fused MoE
kernels (layers/fused_moe.py), which widen them as they load.
"""

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from gridserve.layers.weight_utils import materialize

FP8 = torch.float8_e4m3fn
# Up to this many tokens (decode) a product on CUDA may run in the decode GEMM (decode_gemm.decode_linear, picked by
# linear.apply_linear), which skips the activations' quantization; it is also the row tile of that kernel's tl.dot.
DECODE_GEMM_MAX_M = 16
FP8_MAX = torch.finfo(FP8).max
MIN_AMAX = 1e-12  # an all-zero row or token gets a tiny scale instead of a division by zero
QUANTIZATIONS = ("fp8",)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, float32 scale per row) with w ~= weight * scale[:, None]."""
    scale = w.float().abs().amax(dim=1).clamp(min=MIN_AMAX) / FP8_MAX
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 x, float32 scale (M, 1)) with x ~= q * scale; on CUDA one Triton kernel."""
    if x.is_cuda:
        from gridserve.layers.fused_ops import per_token_quant_fp8

        return per_token_quant_fp8(x)
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * weight_scale).T + bias, with x quantized per token; the result in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    q, x_scale = quantize_per_token(x2)
    if x.is_cuda:
        y = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), bias=bias,
                             out_dtype=x.dtype)
    else:  # the same arithmetic in float32 (CPU _scaled_mm takes only per-tensor scales before torch 2.13)
        y = torch.nn.functional.linear(q.float() * x_scale, weight.float() * weight_scale[:, None],
                                       None if bias is None else bias.float()).to(x.dtype)
    return y.view(*shape[:-1], weight.shape[0])


def quantize_linears(model: nn.Module) -> int:
    """Replaces the weight of every linear layer that allows it (`quantizable`, both dimensions multiples of 16
    as the FP8 GEMM needs) and of every layer of experts by its FP8 form and scales, in place; returns how many
    layers were quantized."""
    from gridserve.layers.linear import LinearBase
    from gridserve.layers.moe import FusedMoE

    count = 0
    for module in model.modules():
        if isinstance(module, FusedMoE) and module.w13_weight.dtype != FP8:
            for name in ("w13", "w2"):  # one scale per (expert, row), like a linear's per row
                w = getattr(module, f"{name}_weight").data
                q, scale = quantize_per_channel(w.reshape(-1, w.shape[-1]))
                setattr(module, f"{name}_weight", nn.Parameter(q.view(w.shape), requires_grad=False))
                setattr(module, f"{name}_scale", scale.view(w.shape[:2]))
            count += 1
        if (isinstance(module, LinearBase) and module.quantizable and module.weight.dtype != FP8
                and module.weight.shape[0] % 16 == 0 and module.weight.shape[1] % 16 == 0):
            weight, scale = quantize_per_channel(module.weight.data)
            module.weight = nn.Parameter(weight, requires_grad=False)
            module.weight_scale = scale
            count += 1
    return count


def effective_quantization(quantization: str | None, hf_config: dict) -> str | None:
    """What the model runs in: --quantization if given, else what the checkpoint declares."""
    return quantization or checkpoint_quantization(hf_config)


def checkpoint_quantization(hf_config: dict) -> str | None:
    """The quantization a checkpoint's config declares ('fp8' or None); others are refused."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "fp8":
        raise ValueError(f"the checkpoint is quantized with {method!r}; gridserve reads fp8 checkpoints only")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError("fp8 checkpoints with static activation scales are not supported (dynamic only)")
    return "fp8"


def dequantize_fp8_checkpoint(weights: Iterable[tuple[str, torch.Tensor]], block: tuple[int, int],
                              dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields the checkpoint's tensors with each FP8 `X.weight` multiplied by its `X.weight_scale_inv` (one
    scale per block of `block` elements) in `dtype`; the scales themselves are consumed. A weight waits for its
    scale when the scale comes later (another shard)."""
    waiting: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        if name.endswith(".weight_scale_inv"):
            base = name[: -len("_scale_inv")]
            if base in waiting:
                yield base, _dequantize(waiting.pop(base), materialize(tensor), block, dtype)
            else:
                scales[base] = materialize(tensor)
        elif name.endswith(".weight") and _is_fp8(tensor):
            if name in scales:
                yield name, _dequantize(materialize(tensor), scales.pop(name), block, dtype)
            else:
                waiting[name] = materialize(tensor)
        else:
            yield name, tensor
    if waiting:
        raise ValueError(f"fp8 weights without a weight_scale_inv: {', '.join(sorted(waiting)[:4])}")


def _dequantize(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    rows, cols = w.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (w.float() * s).to(dtype)


def _is_fp8(t) -> bool:
    """For a lazy safetensors tensor, from its header (nothing is read)."""
    return t.dtype == FP8 if isinstance(t, torch.Tensor) else getattr(t, "dtype_name", "") == "F8_E4M3"
