"""Triton kernels for attention over the paged KV cache: decode, extend and the KV store."""

from gridserve.attention.triton_ops.decode_attention import DecodeWorkspace, decode_attention
from gridserve.attention.triton_ops.extend_attention import extend_attention
from gridserve.attention.triton_ops.kv_store import store_kv

__all__ = ["DecodeWorkspace", "decode_attention", "extend_attention", "store_kv"]
