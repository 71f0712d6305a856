"""The attention backends by name: `--attention-backend` takes its choices from here. Torch-free (the CLI reads
it); a backend's module is imported only when it is made."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from gridserve.attention.base import AttentionBackend

# name -> "module:class"; "auto" picks triton on CUDA and torch elsewhere
ATTENTION_BACKENDS = {
    "torch": "gridserve.attention.torch_backend:TorchAttentionBackend",
    "triton": "gridserve.attention.triton_backend:TritonAttentionBackend",
}


def make_attention_backend(name: str, device: torch.device, cudnn_long_prefill: bool = True,
                           whole_chunk: int = 0) -> AttentionBackend:
    """The backend `name` (or auto's pick for `device`); an unknown name is a ValueError, never a fallback.
    cudnn_long_prefill: the triton backend runs long prompts' attention through cuDNN where that is usable;
    whole_chunk: the length of a long prompt's chunks (the prefill budget), whose shapes get exact cuDNN plans."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend must be one of auto, {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    module, cls = ATTENTION_BACKENDS[name].split(":")
    options = {"device": device, "cudnn_long_prefill": cudnn_long_prefill, "whole_chunk": whole_chunk} \
        if name == "triton" else {}
    return getattr(importlib.import_module(module), cls)(**options)
