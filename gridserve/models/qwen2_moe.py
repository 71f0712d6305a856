import dataclasses

from gridserve.models.config import ModelConfig
from gridserve.models.moe_decoder import MoeDecoderLM, moe_config, sparse_layers


class Qwen2MoeForCausalLM(MoeDecoderLM):
    """Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v bias), experts plus a shared expert
    behind a sigmoid gate."""

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        experts = hf.get("num_experts") or hf.get("num_local_experts", 0)
        layers = sparse_layers(hf["num_hidden_layers"], experts, hf.get("decoder_sparse_step", 1),
                               hf.get("mlp_only_layers"))
        moe = moe_config(hf, experts, hf["moe_intermediate_size"], bool(hf.get("norm_topk_prob", False)), layers,
                         hf.get("shared_expert_intermediate_size", 0))
        bias = hf.get("qkv_bias", hf.get("attention_bias", True))
        return dataclasses.replace(ModelConfig.from_dict({**hf, "attention_bias": bias}), moe=moe)
