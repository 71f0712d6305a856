import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Input is [gate | up] along the last dim; returns silu(gate) * up (one Triton kernel on CUDA)."""
    if x.is_cuda:
        from gridserve.layers import fused_ops

        return fused_ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up

