"""KV cache memory: request slot table, KV slot allocator and the per-layer K/V buffers.

Two levels of indirection, as in SGLang:
  request row (ReqToTokenPool) -> per-token KV slot (TokenToKVPoolAllocator) -> K/V rows (KVCache).
"""

from __future__ import annotations

import torch


class ReqToTokenPool:
    """Request slot -> KV slot indices table."""

    def __init__(self, size: int, max_context_len: int, device: str | torch.device = "cpu"):
        if size <= 0 or max_context_len <= 0:
            raise ValueError(f"size and max_context_len must be positive, got {size}, {max_context_len}")
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int32, device=self.device)
        self.clear()

    def alloc(self) -> int | None:
        if not self._free:
            return None
        idx = self._free.pop()
        self._is_free[idx] = False
        return idx

    def free(self, idx: int) -> None:
        if not 0 <= idx < self.size:
            raise ValueError(f"request slot {idx} out of range [0, {self.size})")
        if self._is_free[idx]:
            raise ValueError(f"request slot {idx} freed twice")
        self._is_free[idx] = True
        self._free.append(idx)

    def available_size(self) -> int:
        return len(self._free)

    def clear(self) -> None:
        # Reversed so pop() hands out low rows first. Rows are not zeroed: a row is always written
        # before it is read.
        self._free = list(range(self.size - 1, -1, -1))
        self._is_free = [True] * self.size


class TokenToKVPoolAllocator:
    """Free list of KV slots. Slot 0 is reserved as a padding slot (dummy writes land there, e.g. for
    padded CUDA-graph batches), so usable slots are 1..size."""

    def __init__(self, size: int, device: str | torch.device = "cpu"):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size = size
        self.device = torch.device(device)
        self.clear()

    def _merge(self) -> None:
        # Frees are only appended to a list; one concatenation happens when the slots are needed.
        if self._pending:
            self._free_slots = torch.cat([self._free_slots, *self._pending])
            self._pending = []
            self._num_pending = 0

    def alloc(self, n: int) -> torch.Tensor | None:
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > self.available_size():
            return None
        if n > self._free_slots.numel():
            self._merge()
        out = self._free_slots[:n]
        self._free_slots = self._free_slots[n:]
        return out

    def free(self, indices: torch.Tensor) -> None:
        if indices.numel() == 0:
            return
        indices = indices.reshape(-1).to(device=self.device, dtype=torch.int64)
        self._pending.append(indices)
        self._num_pending += indices.numel()

    def available_size(self) -> int:
        return self._free_slots.numel() + self._num_pending

    def clear(self) -> None:
        self._free_slots = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)
        self._pending: list[torch.Tensor] = []
        self._num_pending = 0

    def free_slots(self) -> torch.Tensor:
        """Copy of every free slot (debugging / tests)."""
        self._merge()
        return self._free_slots.clone()


class KVCache:
    """Per-layer K and V buffers, (size + 1, num_kv_heads, head_dim) each; row 0 is the padding slot."""

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        start_layer: int = 0,
    ):
        self.size = size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # With pipeline parallelism this stage holds global layers [start_layer, start_layer + num_layers).
        self.start_layer = start_layer
        shape = (size + 1, num_kv_heads, head_dim)
        self.k_buffers = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_buffers = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]

    def _local(self, layer_id: int) -> int:
        local = layer_id - self.start_layer
        if not 0 <= local < self.num_layers:
            raise IndexError(
                f"layer {layer_id} not on this stage (layers {self.start_layer}.."
                f"{self.start_layer + self.num_layers - 1})"
            )
        return local

    def set_kv(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        i = self._local(layer_id)
        self.k_buffers[i][loc] = k.to(self.dtype)
        self.v_buffers[i][loc] = v.to(self.dtype)

    def get_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._local(layer_id)
        return self.k_buffers[i], self.v_buffers[i]

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize
