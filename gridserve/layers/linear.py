"""Linear layers in Megatron's column/row-parallel form. With tp=1 they are plain linears.

Each layer owns a `weight_loader(param, loaded, shard_id)` that copies the slice of a full checkpoint tensor
that belongs to this rank, so the model loader never needs to know how a layer is split. `loaded` may be a
LazyTensor: narrow() then reads only this rank's slice from disk.

With `--quantization fp8` the weight becomes FP8 with a `weight_scale` per row after loading
(layers/quantization.py); a layer that must stay exact sets `quantizable = False`.

`apply_linear` is the one place that picks the kernel for a product (`apply_linear_after_norm` for one that an
RMSNorm precedes, `apply_linear_add_residual` for one that a residual add and a wide RMSNorm follow).
"""

import torch
import torch.nn.functional as F
from torch import nn

from gridserve.distributed.parallel_state import get_tp_group
from gridserve.layers.activation import silu_and_mul
from gridserve.layers.norm import RMSNorm, SummedResidual
from gridserve.layers.quantization import DECODE_GEMM_MAX_M, fp8_linear
from gridserve.layers.weight_utils import materialize

# 2-16 rows on bf16 weights go to the Triton decode GEMM (tl.dot tiles) from this reduction width: on an H100 it beat
# cuBLAS by 2-9% on every shape with K >= 4,096 (cuBLAS splits K there) and lost or tied on narrower ones
# (scripts/bench_fp8_gemm.py, docs/benchmarks.md). One row always goes there.
DECODE_GEMM_MIN_K = 4096
# The residual add and RMSNorm fold into the one-row decode GEMM up to this width. Every program re-reads the input,
# the residual and the norm weight beside its weight rows: on an H200 that saved 1.3-1.8 us on Qwen3-0.6B's
# projections (K = 1,024), nothing on Qwen3-30B-A3B's qkv (2,048), and cost 1.1 and 6.6 us on the 8B's (4,096).
# Wider rows split the norm over the GEMMs before and after it instead (apply_linear_add_residual).
NORM_FOLD_MAX_K = 2048


def _one_cuda_row(x: torch.Tensor) -> bool:
    return x.is_cuda and x.numel() == x.shape[-1]


def _takes_decode_gemm(x: torch.Tensor, rows: int, weight: torch.Tensor, weight_scale: torch.Tensor | None) -> bool:
    """Where the Triton decode GEMM beats cuBLAS: one row on CUDA (its dot-product path beat cuBLAS on every decode
    shape swept), and up to DECODE_GEMM_MAX_M rows of FP8 weights (no activation quantization) or of a reduction
    of DECODE_GEMM_MIN_K or more."""
    few_rows = rows <= DECODE_GEMM_MAX_M and (weight_scale is not None or weight.shape[1] >= DECODE_GEMM_MIN_K)
    return x.is_cuda and (rows == 1 or few_rows)


def _gate_input(x: torch.Tensor, rows: int, gated: bool) -> tuple[torch.Tensor, bool]:
    """(x, gated) as the decode GEMM takes them: the SiLU-and-mul of [gate | up] folds into its kernel only for one
    row on CUDA (folded, every program recomputes the input: it pays on one row); else it runs first."""
    if gated and not (x.is_cuda and rows == 1):
        return silu_and_mul(x), False
    return x, gated


def apply_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """x @ weight.T (+ bias); weight_scale: the weight is FP8 with a scale per row. gated: x is [gate | up] and
    the product takes silu(gate) * up. On CUDA one Triton kernel reads the weights once (decode_gemm.decode_linear)
    where it is the faster choice (_takes_decode_gemm; a gated row's SiLU-and-mul in the same kernel)."""
    rows = x.numel() // x.shape[-1]
    x, gated = _gate_input(x, rows, gated)
    if _takes_decode_gemm(x, rows, weight, weight_scale):
        from gridserve.layers.decode_gemm import decode_linear

        y = decode_linear(x.reshape(rows, x.shape[-1]), weight, weight_scale, bias, gated=gated)
        return y.view(*x.shape[:-1], weight.shape[0])
    if weight_scale is None:
        return F.linear(x, weight, bias)
    return fp8_linear(x, weight, weight_scale, bias)


def apply_linear_after_norm(x: torch.Tensor, residual: torch.Tensor | SummedResidual | None, norm: RMSNorm,
                            weight: torch.Tensor, weight_scale: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None, return_normed: bool = False) -> tuple[torch.Tensor, ...]:
    """(apply_linear(norm(x + residual)), x + residual); no residual: (apply_linear(norm(x)), x). return_normed adds
    the normed input, third. For one row on CUDA one kernel adds, normalises and multiplies
    (decode_gemm.decode_linear_after_norm), where rms_norm and the GEMM are two launches of a few microseconds each:
    up to NORM_FOLD_MAX_K features it sums the row's squares itself. Wider rows (up to DECODE_GEMM_MAX_M of them)
    come with the partial sums that the GEMM before computed (a SummedResidual), and take that kernel too. Otherwise
    the two kernels (folded, every program of the GEMM recomputes the norm: 16 rows of it, or a wide row, cost more
    than a launch)."""
    summed = isinstance(residual, SummedResidual)
    if summed or (_one_cuda_row(x) and x.shape[-1] <= NORM_FOLD_MAX_K):
        from gridserve.layers.decode_gemm import decode_linear_after_norm

        x2 = x.reshape(-1, x.shape[-1])
        r2 = None if residual is None or summed else residual.reshape(x2.shape)
        y, *rest = decode_linear_after_norm(x2, r2, norm.weight, norm.eps, weight, weight_scale, bias,
                                            return_normed=return_normed,
                                            sum_sq_partials=residual.partials if summed else None)
        return (y.view(*x.shape[:-1], weight.shape[0]), *(t.view(x.shape) for t in rest))
    h, residual_out = (norm(x), x) if residual is None else norm(x, residual)
    y = apply_linear(h, weight, weight_scale, bias)
    return (y, residual_out, h) if return_normed else (y, residual_out)


def splits_norm_after(residual: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None
                      ) -> bool:
    """Whether the RMSNorm after a product with this weight splits over it and the next GEMM: rows of more outputs
    than NORM_FOLD_MAX_K (narrower rows fold whole into the GEMM after, at one row), where the decode GEMM takes
    this product (_takes_decode_gemm)."""
    rows = residual.numel() // residual.shape[-1]
    return _takes_decode_gemm(residual, rows, weight, weight_scale) and weight.shape[0] > NORM_FOLD_MAX_K


def apply_linear_add_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              weight_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                              gated: bool = False) -> tuple[torch.Tensor, SummedResidual]:
    """(apply_linear(x) + residual, SummedResidual) where splits_norm_after: the GEMM adds the residual and sums the
    squares of its tiles (decode_gemm.decode_linear_add_residual), and the GEMM after the norm finishes the norm
    (apply_linear_after_norm). That removes the norm's own kernel without each program recomputing a wide row."""
    if not splits_norm_after(residual, weight, weight_scale):
        raise ValueError("the norm splits over two GEMMs only for rows on CUDA wider than NORM_FOLD_MAX_K that the "
                         "decode GEMM takes")
    from gridserve.layers.decode_gemm import decode_linear_add_residual

    rows = residual.numel() // residual.shape[-1]
    x, gated = _gate_input(x, rows, gated)
    y, partials = decode_linear_add_residual(x.reshape(rows, x.shape[-1]), residual.reshape(rows, -1), weight,
                                             weight_scale, bias, gated=gated)
    return y.view(residual.shape), SummedResidual(partials)


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size ({d})")
    return n // d


class LinearBase(nn.Module):
    quantizable = True

    def __init__(self, in_features: int, out_features: int, bias: bool, params_dtype: torch.dtype | None):
        super().__init__()
        self.tp = get_tp_group()
        self.weight_scale: torch.Tensor | None = None  # FP8 weights: one float32 scale per output row
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> torch.Tensor:
        """x @ weight.T (+ bias): in FP8 once the weight has been quantized; `apply_linear` says what gated means."""
        return apply_linear(x, self.weight, self.weight_scale, bias, gated)

    def forward_after_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                           return_normed: bool = False) -> tuple[torch.Tensor, ...]:
        """(self(norm(x + residual)), x + residual[, the normed x]): the norm folded into this projection
        (apply_linear_after_norm). For layers whose input is the whole row on every rank (replicated and
        column-parallel ones); a row-parallel input is split, so RowParallelLinear has no such method."""
        return apply_linear_after_norm(x, residual, norm, self.weight, self.weight_scale, self.bias, return_normed)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, params_dtype=None):
        super().__init__(in_features, out_features, bias, params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        param.data.copy_(materialize(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Splits the output dimension; each rank produces its slice of the outputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, params_dtype=None):
        tp_size = get_tp_group().size
        super().__init__(in_features, _divide(out_features, tp_size, "output features"), bias, params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        rows = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs (e.g. gate and up) stored as one matrix; shard_id picks the part."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, params_dtype=None):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias, params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        tp = self.tp
        per_rank = [s // tp.size for s in self.output_sizes]
        offset = sum(per_rank[:shard_id])
        n = per_rank[shard_id]
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, tp.rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections split by head. When tp > num_kv_heads each rank keeps one KV head and
    the KV heads are replicated across ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, params_dtype=None):
        tp_size = get_tp_group().size
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "attention heads")
        if tp_size >= num_kv_heads:
            if tp_size % num_kv_heads:
                raise ValueError(f"tp size {tp_size} > num_key_value_heads {num_kv_heads} and not a multiple of it")
            self.num_kv_heads = 1
            self.kv_replicas = tp_size // num_kv_heads
        else:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "KV heads")
            self.kv_replicas = 1
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias, params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        rank = self.tp.rank
        if shard_id == "q":
            offset, n, src = 0, q_size, rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            n, src = kv_size, (rank // self.kv_replicas) * kv_size
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, src, n))


class RowParallelLinear(LinearBase):
    """Splits the input dimension; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, params_dtype=None,
                 reduce_results: bool = True):
        tp_size = get_tp_group().size
        super().__init__(_divide(in_features, tp_size, "input features"), out_features, bias, params_dtype)
        self.reduce_results = reduce_results

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # the bias is added once, after the reduction
            param.data.copy_(materialize(loaded))
            return
        cols = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp.rank * cols, cols))

    forward_after_norm = None  # its input is split over the ranks: a norm needs the whole row

    def forward_add_residual(self, x: torch.Tensor, residual: torch.Tensor,
                             gated: bool = False) -> tuple[torch.Tensor, torch.Tensor | SummedResidual]:
        """(self(x), residual) for the RMSNorm after it, or (self(x) + residual, SummedResidual) where the norm
        splits over this GEMM and the next (apply_linear_add_residual): only when no all-reduce comes between."""
        if self.tp.size == 1 and self.reduce_results and splits_norm_after(residual, self.weight, self.weight_scale):
            return apply_linear_add_residual(x, residual, self.weight, self.weight_scale, self.bias, gated)
        return self(x, gated), residual

    def forward(self, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
        y = self.matmul(x, None, gated)
        if self.reduce_results:
            y = self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
