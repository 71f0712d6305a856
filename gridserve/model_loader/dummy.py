"""Random weights in a model's real shapes, for benchmarks where no checkpoint can travel.

The weights are generated as whole, checkpoint-named tensors (one seed per tensor name) and then go through
the model's normal sharding weight loaders, so every tensor-parallel layout gets the same model."""

import zlib
from collections.abc import Iterator

import torch

from gridserve.models.config import ModelConfig


def checkpoint_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Hugging Face names and full shapes of a Llama/Qwen2/Qwen3 checkpoint."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    yield "model.embed_tokens.weight", (cfg.vocab_size, h)
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            yield f"{p}self_attn.{name}.weight", (rows, h)
            if cfg.attention_bias:
                yield f"{p}self_attn.{name}.bias", (rows,)
        yield p + "self_attn.o_proj.weight", (h, q)
        if cfg.qk_norm:
            yield p + "self_attn.q_norm.weight", (d,)
            yield p + "self_attn.k_norm.weight", (d,)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
    yield "model.norm.weight", (h,)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (cfg.vocab_size, h)


def dummy_weights(cfg: ModelConfig, dtype: torch.dtype, device: torch.device
                  ) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    shapes = list(checkpoint_shapes(cfg))

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
