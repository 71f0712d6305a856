"""The decoder family with experts: MoeDecoderLM makes the sparse layers' MLP a SparseMoeBlock, knows the
experts' checkpoint names and shapes, and checks the expert split. Qwen3-MoE, Qwen2-MoE and Mixtral differ
only in their config keys and checkpoint names (qwen3_moe.py, qwen2_moe.py, mixtral.py)."""

import re
from collections.abc import Iterator

from torch import nn

from gridserve.distributed.ranks import moe_split
from gridserve.layers.mlp import GatedMLP
from gridserve.layers.moe import SparseMoeBlock
from gridserve.models.config import ModelConfig, MoEConfig
from gridserve.models.decoder import DecoderLM

# model.layers.N.<block>.experts.E.<matrix>.weight
_EXPERT = re.compile(r"^(model\.layers\.\d+\.)\w+\.experts\.(\d+)\.(\w+)\.weight$")


def sparse_layers(num_layers: int, num_experts: int, step: int = 1, mlp_only: list[int] | None = None
                  ) -> tuple[int, ...]:
    """Qwen-MoE's rule: layer i has experts when it is not in mlp_only_layers and (i + 1) % step == 0."""
    if num_experts <= 0:
        return ()
    return tuple(i for i in range(num_layers) if i not in set(mlp_only or []) and (i + 1) % step == 0)


class MoeDecoderLM(DecoderLM):
    # checkpoint name of an expert's matrices -> gate, up or down
    expert_matrices = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    block_name = "mlp"  # the checkpoint's name of a layer's MoE block (Mixtral: block_sparse_moe)

    @classmethod
    def make_mlp(cls, cfg: ModelConfig, layer_id: int) -> nn.Module:
        moe = cfg.moe
        if layer_id not in moe.sparse_layers:
            return GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        return SparseMoeBlock(cfg.hidden_size, moe.num_experts, moe.top_k, moe.intermediate_size, moe.renormalize,
                              moe.shared_expert_intermediate_size, moe.uniform_routing)

    @classmethod
    def mlp_shapes(cls, cfg: ModelConfig, layer_id: int, prefix: str) -> Iterator[tuple[str, tuple[int, ...]]]:
        moe = cfg.moe
        if layer_id not in moe.sparse_layers:
            yield from super().mlp_shapes(cfg, layer_id, prefix)
            return
        h, i = cfg.hidden_size, moe.intermediate_size
        p = prefix.removesuffix("mlp.") + cls.block_name + "."
        yield p + "gate.weight", (moe.num_experts, h)
        for e in range(moe.num_experts):
            for name, kind in cls.expert_matrices.items():
                yield f"{p}experts.{e}.{name}.weight", (h, i) if kind == "down" else (i, h)
        if moe.shared_expert_intermediate_size:
            s = moe.shared_expert_intermediate_size
            yield p + "shared_expert.gate_proj.weight", (s, h)
            yield p + "shared_expert.up_proj.weight", (s, h)
            yield p + "shared_expert.down_proj.weight", (h, s)
            yield p + "shared_expert_gate.weight", (1, h)

    @classmethod
    def check_mlp_parallel(cls, cfg: ModelConfig, tp: int, ep: int) -> None:
        moe = cfg.moe
        split = moe_split(0, tp, ep)  # ep must divide tp
        if moe.num_experts % ep:
            raise ValueError(f"--ep-size {ep} does not divide the {moe.num_experts} experts")
        if moe.intermediate_size % split.moe_tp_size:
            raise ValueError(f"--tp-size {tp} / --ep-size {ep} = {split.moe_tp_size} does not divide the experts' "
                             f"intermediate size {moe.intermediate_size}")
        if len(moe.sparse_layers) < cfg.num_hidden_layers and cfg.intermediate_size % tp:
            raise ValueError(f"--tp-size {tp} does not divide intermediate_size {cfg.intermediate_size}")
        if moe.shared_expert_intermediate_size % tp:
            raise ValueError(f"--tp-size {tp} does not divide shared_expert_intermediate_size "
                             f"{moe.shared_expert_intermediate_size}")

    def map_weight_name(self, name: str) -> tuple[str, object]:
        m = _EXPERT.match(name)
        if m:
            layer, expert, matrix = m.groups()
            kind = self.expert_matrices[matrix]
            return f"{layer}mlp.experts.{'w2' if kind == 'down' else 'w13'}_weight", (int(expert), kind)
        return super().map_weight_name(name.replace(f".{self.block_name}.", ".mlp."))


def moe_config(hf: dict, num_experts: int, intermediate_size: int, renormalize: bool,
               layers: tuple[int, ...] | None = None, shared: int = 0) -> MoEConfig:
    """The MoEConfig of a Hugging Face config: every layer sparse unless `layers` says which are."""
    if layers is None:
        layers = tuple(range(hf["num_hidden_layers"]))
    return MoEConfig(num_experts, hf["num_experts_per_tok"], intermediate_size, renormalize, layers, shared)
