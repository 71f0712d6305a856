"""What the engine needs of a model, in one interface. A new architecture is a subclass of CausalLM (most
through the decoder family in decoder.py) plus a line in registry.py; the runner, the loaders, the graph
runners, the memory planner and the launcher's split check only ever talk to this interface."""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from gridserve.distributed.pipeline import IntermediateTensors
from gridserve.forward_batch import ForwardBatch
from gridserve.models.config import ModelConfig


@dataclass(frozen=True)
class AttentionShape:
    """What this rank's KV cache holds per token: its pipeline stage's layers and its share of the heads."""

    start_layer: int
    num_layers: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank (replicated when tp exceeds the model's KV heads)
    head_dim: int


class CausalLM(nn.Module):
    """A causal language model, built for this rank's slice of the tensor- and pipeline-parallel grid."""

    config: ModelConfig

    # ---- what the model is, before any weights exist -----------------------------------------------------
    @classmethod
    def config_from_hf(cls, hf: dict) -> ModelConfig:
        """This architecture's reading of a Hugging Face config.json (its defaults for keys the file omits)."""
        return ModelConfig.from_dict(hf)

    @classmethod
    def checkpoint_shapes(cls, cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Hugging Face names and full shapes of every checkpoint tensor (random weights for benchmarks)."""
        raise NotImplementedError

    @classmethod
    def check_parallel(cls, cfg: ModelConfig, tp: int, pp: int = 1, pp_partition: list[int] | None = None,
                       ep: int = 1) -> None:
        """Raises ValueError, with the numbers, when the model cannot be split as asked."""
        raise NotImplementedError

    # ---- running it ----------------------------------------------------------------------------------------
    def attention_shape(self) -> AttentionShape:
        raise NotImplementedError

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                      intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """The layers without the logits: final hidden states on the last pipeline stage, else what the next
        stage needs."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """Logits in the model's dtype (the sampler widens them where it must): one row per request (its last
        token), or every new token's with return_all_logits; into fb.logits_out when it is given."""
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """Logits on the last pipeline stage; on the others, what the next stage needs."""
        out = self.hidden_states(input_ids, positions, fb, intermediate)
        return out if isinstance(out, IntermediateTensors) else self.compute_logits(out, fb)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies checkpoint tensors (HF names) into this rank's parameters; returns the parameter names filled."""
        raise NotImplementedError
