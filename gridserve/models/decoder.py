"""The decoder family (Llama, Qwen2, Qwen3 and their mixture-of-experts kin), written once against the parallel
layers: attention with optional q/k/v bias and q/k norm, and an MLP that each architecture chooses per layer
(dense, or experts). DecoderLM implements the CausalLM interface for all of them."""

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from gridserve.attention.base import QKRotation
from gridserve.distributed.parallel_state import get_pp_group, get_tp_group, pp_layer_range
from gridserve.distributed.pipeline import IntermediateTensors, PPMissingLayer, partition_layers
from gridserve.forward_batch import ForwardBatch
from gridserve.layers.attention import Attention
from gridserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from gridserve.layers.linear import QKVParallelLinear, RowParallelLinear
from gridserve.layers.mlp import GatedMLP
from gridserve.layers.norm import RMSNorm, SummedResidual
from gridserve.layers.rotary import RotaryEmbedding
from gridserve.layers.weight_utils import materialize
from gridserve.models.base import AttentionShape, CausalLM
from gridserve.models.config import ModelConfig


class DecoderAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias=cfg.attention_bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings,
                                          cfg.rope_scaling)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, layer_id, cfg.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention(norm(x + residual)), x + residual): the layer's input norm runs with the qkv projection; the
        pair that o_proj.forward_add_residual returns (the sum already made, where it splits the next norm)."""
        qkv, residual = self.qkv_proj.forward_after_norm(x, residual, norm)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.attn.rotates_in_decode(fb):  # q/k norm, rotary, KV store and attention in one kernel
            out = self.attn(q, k, v, fb, self._rotation(positions))
        else:
            out = self._attend(positions, q, k, v, fb)
        return self.o_proj.forward_add_residual(out, residual)

    def _attend(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                fb: ForwardBatch) -> torch.Tensor:
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        kv_cache = self.attn.fused_kv_store(fb, v)
        q, k = self._norm_and_rotate(positions, q, k, kv_cache)
        if kv_cache is not None:  # the rotary kernel has stored k and v
            return self.attn(q.reshape(-1, self.q_size), None, None, fb)
        return self.attn(q.reshape(-1, self.q_size), k.reshape(-1, self.kv_size), v, fb)

    def _rotation(self, positions: torch.Tensor) -> QKRotation:
        rope = self.rotary_emb
        if self.q_norm is None:
            return QKRotation(positions, rope.inv_freq, rope.attention_scaling)
        return QKRotation(positions, rope.inv_freq, rope.attention_scaling, self.q_norm.weight, self.k_norm.weight,
                          self.q_norm.eps)

    def _norm_and_rotate(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, kv_cache: tuple | None):
        if self.q_norm is None:
            return self.rotary_emb(positions, q, k, kv_cache)
        if q.is_cuda:  # one kernel instead of three
            from gridserve.layers.fused_ops import qk_norm_rope_

            rope = self.rotary_emb
            return qk_norm_rope_(positions, q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                 rope.inv_freq, rope.attention_scaling, kv_cache)
        return self.rotary_emb(positions, self.q_norm(q), self.k_norm(k))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, mlp: nn.Module):
        super().__init__()
        self.self_attn = DecoderAttention(cfg, layer_id)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, fb: ForwardBatch):
        """(this layer's output, the residual stream); residual None on the first layer. Each RMSNorm (with the
        residual add) goes to the projection after it, which for one row on CUDA may do both in one kernel
        (layers/linear.apply_linear_after_norm)."""
        x, residual = self.self_attn(positions, x, residual, self.input_layernorm, fb)
        return self.mlp.forward_after_norm(x, residual, self.post_attention_layernorm)


class DecoderModel(nn.Module):
    """The decoder stack. With pipeline parallelism it holds only this stage's layers (the others are
    placeholders, so names stay global); the first stage embeds, the last applies the final norm."""

    def __init__(self, cfg: ModelConfig, make_mlp: Callable[[ModelConfig, int], nn.Module]):
        super().__init__()
        pp = get_pp_group()
        self.is_first, self.is_last = pp.is_first, pp.is_last
        self.start_layer, self.end_layer = pp_layer_range(cfg.num_hidden_layers)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size) if self.is_first \
            else PPMissingLayer()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, make_mlp(cfg, i)) if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.is_last else PPMissingLayer()

    def forward(self, input_ids, positions, fb: ForwardBatch, intermediate: IntermediateTensors | None = None):
        """The final hidden states on the last stage, else what the next stage needs."""
        if self.is_first:
            x, residual = self.embed_tokens(input_ids), None
        else:
            x, residual = intermediate.hidden, intermediate.residual
        for layer in self.layers[self.start_layer : self.end_layer]:
            x, residual = layer(positions, x, residual, fb)
        if not self.is_last:
            if isinstance(residual, SummedResidual):  # x is already the sum; the next stage adds its residual
                residual = torch.zeros_like(x)
            return IntermediateTensors(x, residual)
        x, _ = self.norm(x, residual)
        return x


# checkpoint name fragment -> (our fused parameter, shard id)
_STACKED = [(".q_proj", ".qkv_proj", "q"), (".k_proj", ".qkv_proj", "k"), (".v_proj", ".qkv_proj", "v"),
            (".gate_proj", ".gate_up_proj", 0), (".up_proj", ".gate_up_proj", 1)]


def _fused_name(name: str) -> tuple[str, str | int | None]:
    for ckpt, ours, shard in _STACKED:
        if ckpt in name:
            return name.replace(ckpt, ours), shard
    return name, None


class DecoderLM(CausalLM):
    """A decoder-only LM of this family: embedding, layers, final norm and LM head, split over the pipeline
    stages. Subclasses choose each layer's MLP (make_mlp) and read their config (config_from_hf)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tp = get_tp_group()
        self.model = DecoderModel(cfg, self.make_mlp)
        if not self.model.is_last:
            self.lm_head = PPMissingLayer()
        else:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
            if cfg.tie_word_embeddings and self.model.is_first:
                self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def make_mlp(cls, cfg: ModelConfig, layer_id: int) -> nn.Module:
        """Layer `layer_id`'s MLP (dense here; experts in the MoE models)."""
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    # ---- CausalLM ------------------------------------------------------------------------------------------
    @classmethod
    def checkpoint_shapes(cls, cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
        h, d = cfg.hidden_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        yield "model.embed_tokens.weight", (cfg.vocab_size, h)
        for n in range(cfg.num_hidden_layers):
            p = f"model.layers.{n}."
            yield p + "input_layernorm.weight", (h,)
            yield p + "post_attention_layernorm.weight", (h,)
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                yield f"{p}self_attn.{name}.weight", (rows, h)
                if cfg.attention_bias:
                    yield f"{p}self_attn.{name}.bias", (rows,)
            yield p + "self_attn.o_proj.weight", (h, q)
            if cfg.qk_norm:
                yield p + "self_attn.q_norm.weight", (d,)
                yield p + "self_attn.k_norm.weight", (d,)
            yield from cls.mlp_shapes(cfg, n, p + "mlp.")
        yield "model.norm.weight", (h,)
        if not cfg.tie_word_embeddings:
            yield "lm_head.weight", (cfg.vocab_size, h)

    @classmethod
    def mlp_shapes(cls, cfg: ModelConfig, layer_id: int, prefix: str) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Checkpoint names and shapes of one layer's MLP (the dense one here)."""
        h, i = cfg.hidden_size, cfg.intermediate_size
        yield prefix + "gate_proj.weight", (i, h)
        yield prefix + "up_proj.weight", (i, h)
        yield prefix + "down_proj.weight", (h, i)

    @classmethod
    def check_parallel(cls, cfg: ModelConfig, tp: int, pp: int = 1, pp_partition: list[int] | None = None,
                       ep: int = 1) -> None:
        partition_layers(cfg.num_hidden_layers, pp, pp_partition)
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        if heads % tp:
            raise ValueError(f"--tp-size {tp} does not divide num_attention_heads {heads}")
        if kv >= tp and kv % tp:
            raise ValueError(f"--tp-size {tp} does not divide num_key_value_heads {kv}")
        if kv < tp and tp % kv:
            raise ValueError(f"--tp-size {tp} is larger than num_key_value_heads {kv} but not a multiple of it, "
                             "so the KV heads cannot be replicated evenly")
        cls.check_mlp_parallel(cfg, tp, ep)

    @classmethod
    def check_mlp_parallel(cls, cfg: ModelConfig, tp: int, ep: int) -> None:
        if ep != 1:
            raise ValueError(f"--ep-size {ep}: {cfg.architecture} has no experts to split (expert parallelism is "
                             "for mixture-of-experts models)")
        if cfg.intermediate_size % tp:
            raise ValueError(f"--tp-size {tp} does not divide intermediate_size {cfg.intermediate_size}")

    def attention_shape(self) -> AttentionShape:
        m = self.model
        attn = m.layers[m.start_layer].self_attn
        return AttentionShape(m.start_layer, m.end_layer - m.start_layer, attn.num_heads, attn.num_kv_heads,
                              attn.head_dim)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                      intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, fb, intermediate)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        if fb.forward_mode.is_extend() and not fb.return_all_logits:
            hidden = hidden[fb.extend_start_loc + fb.extend_seq_lens - 1]
        return self.lm_head.compute_logits(hidden, fb.logits_out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies checkpoint tensors into the (sharded) parameters; returns the parameter names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set()
        tied_last_stage = self.config.tie_word_embeddings and self.model.is_last and not self.model.is_first
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name == "model.embed_tokens.weight" and tied_last_stage:  # the tied head's only copy
                self._load(params["lm_head.weight"], tensor, None)
                loaded.add("lm_head.weight")
            target, shard = self.map_weight_name(name)
            if self._on_other_stage(target):
                continue
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no matching parameter in {type(self).__name__}")
            self._load(params[target], tensor, shard)
            loaded.add(target)
        return loaded

    def map_weight_name(self, name: str) -> tuple[str, object]:
        """A checkpoint tensor's parameter and the shard of it that the tensor fills (None: the whole)."""
        return _fused_name(name)

    @staticmethod
    def _load(param: nn.Parameter, tensor, shard) -> None:
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            param.data.copy_(materialize(tensor))
        else:
            loader(param, tensor, shard)

    def _on_other_stage(self, name: str) -> bool:
        """Whether a checkpoint tensor belongs to a module another pipeline stage holds."""
        m = self.model
        if name.startswith("model.layers."):
            return not m.start_layer <= int(name.split(".")[2]) < m.end_layer
        if name.startswith("model.embed_tokens."):
            return not m.is_first
        if name.startswith(("model.norm.", "lm_head.")):
            return not m.is_last
        return False
