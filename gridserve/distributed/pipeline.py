"""Pipeline-parallel pieces shared by the models and the model runner: which layers a stage holds, the
placeholder for the modules it does not hold, and what one stage hands to the next."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def partition_layers(num_layers: int, pp_size: int, partition: list[int] | None = None) -> list[tuple[int, int]]:
    """[start, end) of each stage's layers. Even split with the remainder on the last stages, or the user's
    `--pp-layer-partition` (one count per stage, summing to num_layers)."""
    if partition is not None:
        if len(partition) != pp_size or sum(partition) != num_layers or min(partition) < 1:
            raise ValueError(f"--pp-layer-partition {','.join(map(str, partition))} must give each of the "
                             f"{pp_size} stages at least one layer and sum to the model's {num_layers} layers")
        counts = list(partition)
    else:
        if num_layers < pp_size:
            raise ValueError(f"--pp-size {pp_size} is larger than the model's {num_layers} layers")
        base, extra = divmod(num_layers, pp_size)
        counts = [base + (1 if s >= pp_size - extra else 0) for s in range(pp_size)]
    bounds, start = [], 0
    for c in counts:
        bounds.append((start, start + c))
        start += c
    return bounds


class PPMissingLayer(nn.Module):
    """Stands where a module of another stage would be, so parameter names and layer indices stay global."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module lives on another pipeline stage")


@dataclass
class IntermediateTensors:
    """What a stage sends to the next one: the hidden states and the residual stream, (tokens, hidden) each."""

    hidden: torch.Tensor
    residual: torch.Tensor


def first_rows(out: torch.Tensor | IntermediateTensors, n: int) -> torch.Tensor | IntermediateTensors:
    """The first n rows of a (padded) forward output: logits or hidden states, or a stage's intermediate."""
    if isinstance(out, IntermediateTensors):
        return IntermediateTensors(out.hidden[:n], out.residual[:n])
    return out[:n]
