import dataclasses

from gridserve.models.config import ModelConfig
from gridserve.models.moe_decoder import MoeDecoderLM, moe_config


class MixtralForCausalLM(MoeDecoderLM):
    """Mixtral: Llama's attention, experts in every layer (block_sparse_moe, matrices w1 = gate, w3 = up,
    w2 = down), top-k weights always renormalised."""

    expert_matrices = {"w1": "gate", "w3": "up", "w2": "down"}
    block_name = "block_sparse_moe"

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        moe = moe_config(hf, hf["num_local_experts"], hf["intermediate_size"], renormalize=True)
        return dataclasses.replace(ModelConfig.from_dict(hf), moe=moe)
