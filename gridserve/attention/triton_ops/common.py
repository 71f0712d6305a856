"""Host-side checks and launch settings shared by the paged attention kernels."""

import os
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class PagedShapes:
    num_heads: int
    head_dim: int
    num_kv_heads: int
    head_dim_v: int
    group: int  # query heads per KV head
    block_d: int  # head dims padded to a power of two >= 16, as tl.dot needs
    block_dv: int
    dot_precision: str
    dot_fp32: bool


def check_paged_inputs(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                       req_to_token: torch.Tensor) -> tuple[torch.Tensor, PagedShapes]:
    """Validates q (tokens, heads, head_dim) against the paged K/V buffers (slots, kv_heads, head_dim);
    returns q made contiguous in its last dimension, and the shapes and settings the kernels take."""
    if q.dim() != 3 or k_buffer.dim() != 3 or v_buffer.dim() != 3:
        raise ValueError("q, k_buffer, v_buffer must be 3-D: (tokens, heads, head_dim) / (slots, kv_heads, head_dim)")
    _, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k_buffer.shape[1], v_buffer.shape[2]
    if k_buffer.shape[2] != head_dim or v_buffer.shape[1] != num_kv_heads:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_buffer.shape)}, v {tuple(v_buffer.shape)}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} not a multiple of num_kv_heads {num_kv_heads}")
    if max(head_dim, head_dim_v) > 256:
        raise ValueError(f"head_dim up to 256 supported, got {head_dim}/{head_dim_v}")
    if k_buffer.stride(2) != 1 or v_buffer.stride(2) != 1 or req_to_token.stride(1) != 1:
        raise ValueError("k_buffer, v_buffer and req_to_token must be contiguous in their last dimension")
    if q.stride(2) != 1:
        q = q.contiguous()
    shapes = PagedShapes(
        num_heads, head_dim, num_kv_heads, head_dim_v, num_heads // num_kv_heads,
        max(16, triton.next_power_of_2(head_dim)), max(16, triton.next_power_of_2(head_dim_v)),
        "ieee" if q.dtype == torch.float32 else "tf32",
        # The interpreter's tl.dot mishandles bf16 operands (stored as uint16): take the dots in fp32 there.
        q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
    )
    return q, shapes
