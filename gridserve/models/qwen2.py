from gridserve.models.config import ModelConfig
from gridserve.models.decoder import DecoderLM


class Qwen2ForCausalLM(DecoderLM):
    """Qwen2: biases on q/k/v (config.json usually leaves `attention_bias` out: it is on by default)."""

    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        return ModelConfig.from_dict({"attention_bias": True, **hf})
