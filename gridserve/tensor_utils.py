"""Host-to-device copies that never make the CPU wait for the GPU.

`torch.tensor(values, device="cuda")` copies from pageable memory and synchronises the stream, so the CPU
waits for every kernel already queued: that would undo the overlap of scheduling with the GPU's work. Staging
the values in pinned memory and copying asynchronously keeps the launch queue full.
"""

import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (nested) list of numbers as a tensor on `device`, without a host sync on CUDA."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
