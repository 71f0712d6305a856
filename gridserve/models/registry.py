"""Every supported architecture, by the name in config.json's `architectures`: the one place to register one."""

from gridserve.models.base import CausalLM
from gridserve.models.config import ModelConfig, architecture_of
from gridserve.models.llama import LlamaForCausalLM
from gridserve.models.mixtral import MixtralForCausalLM
from gridserve.models.qwen2 import Qwen2ForCausalLM
from gridserve.models.qwen2_moe import Qwen2MoeForCausalLM
from gridserve.models.qwen3 import Qwen3ForCausalLM
from gridserve.models.qwen3_moe import Qwen3MoeForCausalLM

MODELS: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
}


def model_class(architecture: str) -> type[CausalLM]:
    if architecture not in MODELS:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: {', '.join(MODELS)}")
    return MODELS[architecture]


def get_model_class(cfg: ModelConfig) -> type[CausalLM]:
    return model_class(cfg.architecture)


def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of a Hugging Face config dict, as its architecture's class reads it."""
    return model_class(architecture_of(hf)).config_from_hf(hf)
