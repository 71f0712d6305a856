"""Which (dp, pp, tp) ranks exist, which node runs each, and which GPU each gets. The one place for it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class RankInfo:
    dp_rank: int
    pp_rank: int
    tp_rank: int
    global_rank: int  # dp offset + pp_rank * tp + tp_rank; ranks are contiguous per node
    local_rank: int  # index among this node's ranks
    gpu_id: int

    @property
    def name(self) -> str:
        return f"dp{self.dp_rank} pp{self.pp_rank} tp{self.tp_rank}"


def node_ranks(tp: int, pp: int, dp: int, nnodes: int = 1, node_rank: int = 0, base_gpu_id: int = 0,
               gpu_id_step: int = 1) -> list[RankInfo]:
    """The ranks that run on node `node_rank`, in global-rank order."""
    world = tp * pp * dp
    if world % nnodes:
        raise ValueError(f"tp * pp * dp = {world} ranks cannot be spread evenly over {nnodes} nodes")
    per_node = world // nnodes
    first = node_rank * per_node
    ranks = []
    for g in range(first, first + per_node):
        dp_rank, rest = divmod(g, tp * pp)
        pp_rank, tp_rank = divmod(rest, tp)
        local = g - first
        ranks.append(RankInfo(dp_rank, pp_rank, tp_rank, g, local, base_gpu_id + local * gpu_id_step))
    return ranks
