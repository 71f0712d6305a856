"""Random weights in a model's real shapes, for benchmarks where no checkpoint can travel.

The weights are generated as whole, checkpoint-named tensors (one seed per tensor name) and then go through
the model's normal sharding weight loaders, so every tensor-parallel layout gets the same model."""

import zlib
from collections.abc import Iterator

import torch

from gridserve.models.config import ModelConfig
from gridserve.models.registry import get_model_class


def dummy_weights(cfg: ModelConfig, dtype: torch.dtype, device: torch.device
                  ) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    shapes = list(get_model_class(cfg).checkpoint_shapes(cfg))

    def gen():
        g = torch.Generator(device=device)
        for name, shape in shapes:
            if name.endswith("norm.weight"):  # norms at their usual 1, so activations keep a sane scale
                yield name, torch.ones(shape, dtype=dtype, device=device)
                continue
            g.manual_seed(zlib.crc32(name.encode()))
            t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=g)
            yield name, t.to(dtype)

    return len(shapes), gen()
