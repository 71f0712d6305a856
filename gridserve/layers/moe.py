"""Mixture-of-experts layers: the router and the experts, split over the tensor-parallel group.

With expert parallelism (`--ep-size P`, P dividing the TP size T) the experts are split over P groups of T / P
ranks, and each expert's intermediate dimension over the T / P ranks of its group (P = 1: every rank holds
every expert's slice, what SGLang does without EP). Every rank sees every token (attention is tensor-parallel,
its output replicated), routes all of them the same way, runs only its own experts on the tokens routed to
them, and one all-reduce over the TP group sums the partial outputs: of other experts, and of other slices.

On CUDA the router's top-k and the experts run in the fused Triton kernels (fused_moe.py); elsewhere in the
PyTorch reference below.
"""

import torch
import torch.nn.functional as F
from torch import nn

from gridserve.distributed.parallel_state import get_tp_group, moe_split
from gridserve.layers.linear import ReplicatedLinear
from gridserve.layers.mlp import GatedMLP
from gridserve.layers.norm import RMSNorm
from gridserve.layers.weight_utils import materialize


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids), each (tokens, top_k): softmax over all experts in float32, the top k, and with
    `renormalize` those k weights scaled to sum to 1."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  local_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """sum over k of weights[t, k] * expert(local_ids[t, k])(x[t]), for the experts on this rank (ids >= 0);
    an expert is down(silu(gate(x)) * up(x)) with w13 = [gate; up] (E, 2I, H) and w2 = down (E, H, I). FP8
    weights are widened with their row scales (E, 2I) and (E, H)."""
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    for e in local_ids.unique().tolist():
        if e < 0:
            continue
        tokens, slot = (local_ids == e).nonzero(as_tuple=True)
        gate_up, down = w13[e], w2[e]
        if w13_scale is not None:
            gate_up = (gate_up.float() * w13_scale[e][:, None]).to(x.dtype)
            down = (down.float() * w2_scale[e][:, None]).to(x.dtype)
        h = F.linear(x[tokens], gate_up)
        y = F.linear(F.silu(h[:, :inter]) * h[:, inter:], down)
        out.index_add_(0, tokens, y * weights[tokens, slot, None].to(y.dtype))
    return out


HASH_BYTES = 32  # of a token's hidden state, hashed into its experts' offset


def uniform_router_logits(x: torch.Tensor, num_experts: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Router logits (tokens, num_experts) whose top k are k experts spread evenly over all of them, equal (0; the
    rest -1e4), so the routing weights are 1/k: experts o, o + s, ..., o + (k - 1) s (mod num_experts) with
    s = num_experts // k, and the offset o a hash of the token's hidden state's first bytes. Each token and step
    gets its own offset, with no host sync (CUDA graphs) and the same on every rank (x is replicated). On CUDA one
    Triton kernel (fused_moe.uniform_logits) computes the same."""
    if x.is_cuda:
        from gridserve.layers.fused_moe import uniform_logits

        return uniform_logits(x, num_experts, top_k, dtype, HASH_BYTES)
    head = x.contiguous().view(torch.uint8)[:, :HASH_BYTES].long()
    mult = torch.arange(1, 2 * head.shape[1], 2, device=x.device) * 2654435761  # odd multipliers
    offset = (head * mult).sum(-1) % num_experts
    rel = (torch.arange(num_experts, device=x.device)[None, :] - offset[:, None]) % num_experts
    stride = num_experts // top_k
    chosen = (rel % stride == 0) & (rel // stride < top_k)
    return torch.where(chosen, 0.0, -1e4).to(dtype)


class FusedMoE(nn.Module):
    """This rank's experts: w13 (local experts, 2 x intermediate slice, hidden) and w2 (local experts, hidden,
    intermediate slice). forward returns the partial sum; the caller all-reduces it (once, with any shared
    expert's partial sum)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool):
        super().__init__()
        split = moe_split()
        if num_experts % split.ep_size:
            raise ValueError(f"--ep-size {split.ep_size} does not divide the {num_experts} experts")
        if intermediate_size % split.moe_tp_size:
            raise ValueError(f"the experts' intermediate size {intermediate_size} does not split over "
                             f"{split.moe_tp_size} ranks (--tp-size / --ep-size)")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.num_local = num_experts // split.ep_size
        self.first_expert = split.ep_rank * self.num_local
        self.inter = intermediate_size // split.moe_tp_size
        self.moe_tp_rank = split.moe_tp_rank
        dtype = torch.get_default_dtype()
        self.w13_weight = nn.Parameter(torch.empty(self.num_local, 2 * self.inter, hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(self.num_local, hidden_size, self.inter, dtype=dtype),
                                      requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        self.w13_scale: torch.Tensor | None = None  # FP8 experts (--quantization fp8): a scale per (expert, row)
        self.w2_scale: torch.Tensor | None = None
        # global expert id -> local id, -1 for the experts other ranks hold
        local = torch.full((num_experts,), -1, dtype=torch.int32)
        local[self.first_expert:self.first_expert + self.num_local] = torch.arange(self.num_local, dtype=torch.int32)
        self.register_buffer("local_ids", local, persistent=False)

    def weight_loader(self, param: nn.Parameter, loaded, shard: tuple[int, str]) -> None:
        """Copies this rank's slice of expert `shard[0]`'s checkpoint tensor `shard[1]` (gate, up or down); the
        experts of other ranks are skipped."""
        expert, kind = shard
        e = expert - self.first_expert
        if not 0 <= e < self.num_local:
            return
        start = self.moe_tp_rank * self.inter
        if kind == "down":
            param.data[e].copy_(materialize(loaded.narrow(1, start, self.inter)))
        else:
            rows = slice(0, self.inter) if kind == "gate" else slice(self.inter, 2 * self.inter)
            param.data[e, rows].copy_(materialize(loaded.narrow(0, start, self.inter)))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from gridserve.layers.fused_moe import fused_moe_routed

            # routing included: at decode it runs inside the experts' first kernel, saving a launch per layer
            return fused_moe_routed(x, router_logits, self.w13_weight, self.w2_weight, self.top_k, self.renormalize,
                                    self.local_ids, w13_scale=self.w13_scale, w2_scale=self.w2_scale)
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        return moe_reference(x, self.w13_weight, self.w2_weight, weights, self.local_ids[ids], self.w13_scale,
                             self.w2_scale)


class SparseMoeBlock(nn.Module):
    """A layer's MLP as experts: the router (`gate`, replicated), the experts, and optionally a shared expert
    every token goes through, scaled by its own sigmoid gate (Qwen2-MoE). One all-reduce sums the partial
    outputs of this rank's experts and its slice of the shared expert."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, renormalize: bool,
                 shared_intermediate_size: int = 0, uniform_routing: bool = False):
        super().__init__()
        self.uniform_routing = uniform_routing  # benchmarks on random weights: see uniform_router_logits
        self.gate = ReplicatedLinear(hidden_size, num_experts)
        self.gate.quantizable = False  # it picks the experts: FP8 error would change the choice
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize)
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1)
            self.shared_expert_gate.quantizable = False
        self.tp = get_tp_group()

    def forward_after_norm(self, x: torch.Tensor, residual: torch.Tensor,
                           norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x + residual)), x + residual). The norm is folded into the router's GEMM, which also hands
        back the normed x for the experts (for one row on CUDA: one kernel for the add, the norm and the router)."""
        router_logits, residual, x = self.gate.forward_after_norm(x, residual, norm, return_normed=True)
        return self._experts(x, router_logits), residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._experts(x, self.gate(x))

    def _experts(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.uniform_routing:  # the router still runs (its time counts); its choice is replaced
            router_logits = uniform_router_logits(x, router_logits.shape[-1], self.experts.top_k, router_logits.dtype)
        y = self.experts(x, router_logits)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(y)
