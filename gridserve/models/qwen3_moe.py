import dataclasses

from gridserve.models.config import ModelConfig
from gridserve.models.moe_decoder import MoeDecoderLM, moe_config, sparse_layers


class Qwen3MoeForCausalLM(MoeDecoderLM):
    """Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (q/k norm), experts in the layers that
    decoder_sparse_step and mlp_only_layers pick, top-k weights renormalised when norm_topk_prob."""

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        experts = hf.get("num_experts") or hf.get("num_local_experts", 0)
        layers = sparse_layers(hf["num_hidden_layers"], experts, hf.get("decoder_sparse_step", 1),
                               hf.get("mlp_only_layers"))
        moe = moe_config(hf, experts, hf["moe_intermediate_size"], bool(hf.get("norm_topk_prob", False)), layers)
        return dataclasses.replace(ModelConfig.from_dict(hf), qk_norm=True, moe=moe)
