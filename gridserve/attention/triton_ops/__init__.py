"""Triton kernels for attention (paged decode)."""

from gridserve.attention.triton_ops.decode_attention import DecodeWorkspace, decode_attention

__all__ = ["DecodeWorkspace", "decode_attention"]
