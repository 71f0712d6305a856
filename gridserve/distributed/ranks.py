"""Which (dp, pp, tp) ranks exist, which node runs each, which replica each belongs to and which GPU each gets.
The one place for rank arithmetic: the launcher, the scheduler processes and the process groups read it.

Global rank = dp_rank * (tp * pp) + pp_rank * tp + tp_rank. A DP replica is one tp x pp world with its own
torch.distributed rendezvous; inside it a rank is known by its replica rank (pp_rank * tp + tp_rank). Ranks are
contiguous per node, so a replica may span nodes and replicas may live on different nodes.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """The parallel grid of a deployment: dp replicas of tp x pp ranks, spread evenly over nnodes."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    nnodes: int = 1

    def __post_init__(self) -> None:
        if self.world_size % self.nnodes:
            raise ValueError(f"tp * pp * dp = {self.world_size} ranks cannot be spread evenly over "
                             f"{self.nnodes} nodes")

    @property
    def replica_size(self) -> int:
        """Ranks in one DP replica (its torch.distributed world)."""
        return self.tp * self.pp

    @property
    def world_size(self) -> int:
        return self.replica_size * self.dp

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def tp_groups(self) -> list[tuple[int, ...]]:
        """The replica ranks of each TP group (one per pipeline stage), in stage order."""
        return [tuple(p * self.tp + t for t in range(self.tp)) for p in range(self.pp)]

    def pp_groups(self) -> list[tuple[int, ...]]:
        """The replica ranks of each PP group (one per tensor-parallel rank), in tp-rank order."""
        return [tuple(p * self.tp + t for p in range(self.pp)) for t in range(self.tp)]

    def rank(self, global_rank: int, base_gpu_id: int = 0, gpu_id_step: int = 1) -> "RankInfo":
        dp_rank, replica_rank = divmod(global_rank, self.replica_size)
        pp_rank, tp_rank = divmod(replica_rank, self.tp)
        node_rank, local_rank = divmod(global_rank, self.ranks_per_node)
        return RankInfo(self, dp_rank, pp_rank, tp_rank, global_rank, node_rank, local_rank,
                        base_gpu_id + local_rank * gpu_id_step)

    def io_rank_nodes(self) -> list[int]:
        """The node of each replica's IO rank (its replica rank 0), by dp rank."""
        return [self.rank(r * self.replica_size).node_rank for r in range(self.dp)]

    def node_ranks(self, node_rank: int = 0, base_gpu_id: int = 0, gpu_id_step: int = 1) -> list["RankInfo"]:
        """The ranks that run on node `node_rank`, in global-rank order."""
        first = node_rank * self.ranks_per_node
        return [self.rank(g, base_gpu_id, gpu_id_step) for g in range(first, first + self.ranks_per_node)]


@dataclass(frozen=True)
class RankInfo:
    layout: Layout
    dp_rank: int
    pp_rank: int
    tp_rank: int
    global_rank: int
    node_rank: int
    local_rank: int  # index among this node's ranks
    gpu_id: int

    @property
    def replica_rank(self) -> int:
        """This rank's place in its replica's torch.distributed world."""
        return self.pp_rank * self.layout.tp + self.tp_rank

    @property
    def is_io_rank(self) -> bool:
        """tp 0 of stage 0: the rank that reads its replica's requests from ZMQ and sends its outputs on."""
        return self.replica_rank == 0

    @property
    def name(self) -> str:
        return f"dp{self.dp_rank} pp{self.pp_rank} tp{self.tp_rank}"


def node_ranks(tp: int, pp: int, dp: int, nnodes: int = 1, node_rank: int = 0, base_gpu_id: int = 0,
               gpu_id_step: int = 1) -> list[RankInfo]:
    """The ranks that run on node `node_rank`, in global-rank order."""
    return Layout(tp, pp, dp, nnodes).node_ranks(node_rank, base_gpu_id, gpu_id_step)


@dataclass(frozen=True)
class MoESplit:
    """Where a rank sits in the experts' split: `ep_size` groups of experts over the TP group, each expert's
    intermediate dimension over the `moe_tp_size` = tp / ep ranks of its group."""

    ep_rank: int = 0
    ep_size: int = 1
    moe_tp_rank: int = 0
    moe_tp_size: int = 1


def moe_split(tp_rank: int, tp_size: int, ep_size: int) -> MoESplit:
    """TP rank r holds expert group r // (tp / ep) and intermediate slice r % (tp / ep): consecutive ranks share
    experts, so with ep = tp every rank holds whole experts of its own."""
    if ep_size < 1 or tp_size % ep_size:
        raise ValueError(f"--ep-size {ep_size} must divide --tp-size {tp_size}")
    moe_tp = tp_size // ep_size
    return MoESplit(tp_rank // moe_tp, ep_size, tp_rank % moe_tp, moe_tp)
