"""The gated MLP of the decoder family, down(silu(gate(x)) * up(x)), with gate and up in one column-parallel
matrix and down row-parallel. The SiLU-and-mul is the down projection's gated input: for one row on CUDA it is
computed inside the down GEMM (layers/linear.py)."""

import torch
from torch import nn

from gridserve.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from gridserve.layers.norm import RMSNorm, SummedResidual


class GatedMLP(nn.Module):
    """reduce_results=False leaves the all-reduce to the caller (an MoE layer sums its shared expert's partial
    output with the experts' in one all-reduce)."""

    def __init__(self, hidden_size: int, intermediate_size: int, reduce_results: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, reduce_results=reduce_results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x), gated=True)

    def forward_after_norm(self, x: torch.Tensor, residual: torch.Tensor | SummedResidual,
                           norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor | SummedResidual]:
        """(self(norm(x + residual)), x + residual), the norm folded into gate/up where apply_linear_after_norm
        folds it (one row on CUDA), and the pair that down_proj.forward_add_residual returns (the sum already made,
        where it splits the next layer's norm)."""
        h, residual = self.gate_up_proj.forward_after_norm(x, residual, norm)
        return self.down_proj.forward_add_residual(h, residual, gated=True)
