"""Checkpoint tensors that are read lazily, so each tensor-parallel rank reads only its own slice."""

import torch


class LazyTensor:
    """A safetensors tensor, not yet read. narrow() reads only the requested rows/columns."""

    def __init__(self, safe_slice):
        self._slice = safe_slice
        self.shape = tuple(safe_slice.get_shape())
        self.dtype_name = safe_slice.get_dtype()  # safetensors' name, e.g. "BF16", "F8_E4M3"

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]

    def materialize(self) -> torch.Tensor:
        return self._slice[:]


def materialize(t: "torch.Tensor | LazyTensor") -> torch.Tensor:
    return t.materialize() if isinstance(t, LazyTensor) else t
