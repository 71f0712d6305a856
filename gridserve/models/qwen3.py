import dataclasses

from gridserve.models.config import ModelConfig
from gridserve.models.decoder import DecoderLM


class Qwen3ForCausalLM(DecoderLM):
    """Qwen3: per-head RMSNorm on q and k before rotary."""

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        return dataclasses.replace(ModelConfig.from_dict(hf), qk_norm=True)
