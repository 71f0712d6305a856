from torch import nn

from gridserve.models.config import ModelConfig
from gridserve.models.llama import LlamaForCausalLM
from gridserve.models.qwen2 import Qwen2ForCausalLM
from gridserve.models.qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.architecture not in MODELS:
        raise ValueError(f"architecture {cfg.architecture!r} is not supported; supported: {', '.join(MODELS)}")
    return MODELS[cfg.architecture]
