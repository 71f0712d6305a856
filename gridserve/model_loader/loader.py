"""Finds a model (HF folder, GGUF file, or the embedded default), builds it and loads its weights."""

import functools
import glob
import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from gridserve.layers.quantization import (
    checkpoint_quantization,
    dequantize_fp8_checkpoint,
    effective_quantization,
    quantize_linears,
)
from gridserve.layers.weight_utils import LazyTensor
from gridserve.model_loader.dummy import dummy_weights
from gridserve.model_loader.paths import is_gguf, resolve_model_path  # noqa: F401 (re-exported)
from gridserve.models.config import ModelConfig, parse_dtype
from gridserve.models.registry import config_from_hf, get_model_class


@functools.lru_cache(maxsize=2)
def open_gguf(path: str):
    """Opening a GGUF parses its whole metadata (its vocabulary included): do it once per process."""
    from gridserve.model_loader.gguf_loader import GGUFCheckpoint

    return GGUFCheckpoint(path)


def load_model_config(path: str) -> ModelConfig:
    if is_gguf(path):
        cfg = open_gguf(path).config
    else:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        gen = os.path.join(path, "generation_config.json")
        if os.path.exists(gen):  # generation_config's eos ids are the ones generation should stop on
            with open(gen) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                cfg = {**cfg, "eos_token_id": eos}
    return config_from_hf(cfg)


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, f) for f in files]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def _iter_safetensors(path: str) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    files = _safetensors_files(path)
    total = 0
    for fn in files:
        with safe_open(fn, framework="pt") as f:
            total += len(f.keys())

    def gen():
        for fn in files:
            with safe_open(fn, framework="pt") as f:
                for name in f.keys():
                    yield name, LazyTensor(f.get_slice(name))

    return total, gen()


def resolve_dtype(dtype: str, cfg: ModelConfig) -> torch.dtype:
    return cfg.dtype if dtype == "auto" else parse_dtype(dtype)


def load_model(path: str, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               load_format: str = "auto", show_progress: bool = True, quantization: str | None = None) -> nn.Module:
    """Builds the model on `device` in `dtype` and fills it from the checkpoint (or randomly for 'dummy'); with
    `quantization` 'fp8', or an FP8 checkpoint, its linear layers end in FP8 (layers/quantization.py)."""
    fp8 = effective_quantization(quantization, cfg.hf_config) == "fp8"
    from_fp8 = checkpoint_quantization(cfg.hf_config) == "fp8" and load_format != "dummy"
    model_cls = get_model_class(cfg)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(old)
    if load_format == "dummy":  # random weights in the real shapes, for benchmarks without a checkpoint
        total, weights = dummy_weights(cfg, dtype, device)
    elif is_gguf(path):
        ckpt = open_gguf(path)
        total, weights = len(ckpt), ckpt.tensors()
    else:
        total, weights = _iter_safetensors(path)
    bar = tqdm(weights, total=total, desc="Loading weights", unit="tensor", disable=not show_progress)
    if from_fp8:  # its scales are consumed on the way: the bar counts tensors read
        block = tuple(cfg.hf_config["quantization_config"].get("weight_block_size") or (128, 128))
        bar = dequantize_fp8_checkpoint(bar, block, dtype)
    loaded = model.load_weights(bar)
    expected = {n for n, _ in model.named_parameters()}
    missing = expected - loaded
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for: {', '.join(sorted(missing)[:8])}")
    if fp8:
        quantize_linears(model)
    return model.eval()
