"""The one place that knows this process's parallel ranks and groups.

Until tensor/pipeline parallelism lands every group has size 1, and the collectives below are identities.
Layers call only these functions, so adding real groups changes this file and nothing in the models.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class GroupCoordinator:
    """A process group plus this rank's position in it."""

    rank: int = 0
    size: int = 1
    device_group: object = None  # torch.distributed group for tensors (NCCL on GPU, gloo on CPU)
    cpu_group: object = None  # gloo group for small control messages

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)


_TP = GroupCoordinator()
_PP = GroupCoordinator()


def get_tp_group() -> GroupCoordinator:
    return _TP


def get_pp_group() -> GroupCoordinator:
    return _PP


def tp_rank() -> int:
    return _TP.rank


def tp_size() -> int:
    return _TP.size
