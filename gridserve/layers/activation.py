import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """Input is [gate | up] along the last dim; returns silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from gridserve.layers.fused_ops import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
