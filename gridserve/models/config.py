"""ModelConfig: the architecture facts the engine needs, read from a Hugging Face config dict. The generic
reading is here; each model class's config_from_hf adds its architecture's defaults and switches.

Reads both the classic keys (rope_theta, rope_scaling) and transformers v5's rope_parameters.
"""

from dataclasses import dataclass, field, replace

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float": torch.float32, "half": torch.float16, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp32": torch.float32}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


@dataclass(frozen=True)
class MoEConfig:
    """The experts of a mixture-of-experts model (set by its class's config_from_hf)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    renormalize: bool  # scale the top-k routing weights to sum to 1
    sparse_layers: tuple[int, ...]  # the layers whose MLP is the experts (the others are dense)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a dense expert every token goes through, gated
    uniform_routing: bool = False  # --moe-routing uniform: the router's choice replaced by an even spread


@dataclass
class ModelConfig:
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    dtype: torch.dtype
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    hf_config: dict = field(default_factory=dict, repr=False)
    moe: MoEConfig | None = None

    def with_moe_routing(self, routing: str) -> "ModelConfig":
        """This config with --moe-routing applied: "uniform" spreads an MoE model's tokens evenly over its experts;
        "model", or a dense model, leaves it as it is."""
        if routing != "uniform" or self.moe is None:
            return self
        return replace(self, moe=replace(self.moe, uniform_routing=True))

    def check_parallel(self, tp: int, pp: int = 1, pp_partition: list[int] | None = None, ep: int = 1) -> None:
        """Raises ValueError, with the numbers, when the model cannot be split as asked (its class decides)."""
        from gridserve.models.registry import get_model_class  # the registry imports the models, which import this

        get_model_class(self).check_parallel(self, tp, pp, pp_partition, ep)

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type", "llama")
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or None
        if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
            scaling = rope
        if scaling is not None:
            scaling = dict(scaling)
            scaling.setdefault("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        eos = cfg.get("eos_token_id")
        return cls(
            architecture=architecture_of(cfg),
            model_type=model_type,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            qk_norm=False,  # an architecture's own switch: its class's config_from_hf sets it
            dtype=parse_dtype(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            bos_token_id=cfg.get("bos_token_id"),
            hf_config=cfg,
        )


# model_type -> architecture, for configs without `architectures`
_DEFAULT_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM"}


def architecture_of(hf: dict) -> str:
    """The class name a Hugging Face config asks for."""
    return (hf.get("architectures") or [_DEFAULT_ARCH.get(hf.get("model_type", "llama"), "LlamaForCausalLM")])[0]
