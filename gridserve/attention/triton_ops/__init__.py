"""Triton kernels for attention over the paged KV cache: decode and extend."""

from gridserve.attention.triton_ops.decode_attention import DecodeWorkspace, decode_attention
from gridserve.attention.triton_ops.extend_attention import extend_attention

__all__ = ["DecodeWorkspace", "decode_attention", "extend_attention"]
