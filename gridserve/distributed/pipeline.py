"""Pipeline-parallel pieces shared by the models and the model runner: which layers a stage holds, the
placeholder for the modules it does not hold, what one stage hands to the next, and how busy a stage is."""

from __future__ import annotations

import time
from collections import deque
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


class BusyClock:
    """Device time a stage spends running its layers, for the pipeline's idle fraction. On CUDA it records
    events on the stage's stream and reads them once they have completed, so it never waits; on CPU the
    forward is synchronous and the host clock is the device clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._busy_s = 0.0
        self._start: torch.cuda.Event | float | None = None
        self._pending: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()

    def start(self) -> None:
        self._start = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
        if self.cuda:
            self._start.record()

    def stop(self) -> None:
        if not self.cuda:
            self._busy_s += time.perf_counter() - self._start
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((self._start, end))
        self.busy_s()  # keeps the queue short

    def busy_s(self) -> float:
        """Seconds of device work so far (work still running on the device is counted once it completes)."""
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            self._busy_s += start.elapsed_time(end) / 1e3
        return self._busy_s
