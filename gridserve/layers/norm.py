from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SummedResidual:
    """Stands in for the residual where the projection before an RMSNorm has already added it to x
    (linear.apply_linear_add_residual): x is the residual stream itself, and `partials` (rows, programs) are
    partial sums of the squares of its rows, which the GEMM after the norm adds up in place of a norm kernel."""
    partials: torch.Tensor


class RMSNorm(nn.Module):
    """RMSNorm computed in float32. forward(x, residual) fuses the residual add: returns (normed, x + residual)
    (a SummedResidual: (normed, x))."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | SummedResidual | None = None):
        if isinstance(residual, SummedResidual):  # x already holds the sum
            return self.forward(x), x
        if x.is_cuda:
            from gridserve.layers.fused_ops import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
