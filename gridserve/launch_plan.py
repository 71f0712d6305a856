"""LaunchPlan: what each node of a deployment starts, by role. Torch-free, so `gridserve serve --dry-run` can
print every node's plan before anyone rents the nodes.

Node 0 runs its ranks' schedulers, the detokenizer, the DP controller (dp > 1) and, in the launching process,
the front end (HTTP or gRPC server and TokenizerManager). Every other node runs only its ranks' schedulers.
"""

from dataclasses import dataclass

from gridserve.distributed.ranks import Layout, RankInfo
from gridserve.server_args import ServerArgs


@dataclass
class LaunchPlan:
    layout: Layout
    node_rank: int
    ranks: list[RankInfo]  # this node's schedulers, in global-rank order
    detokenizer: bool
    dp_controller: bool
    tokenizer_manager: bool  # the front end lives in the launching process

    @classmethod
    def for_node(cls, args: ServerArgs, node_rank: int | None = None) -> "LaunchPlan":
        """The plan of node `node_rank` (default: this node, --node-rank)."""
        node = args.node_rank if node_rank is None else node_rank
        layout = Layout(args.tp_size, args.pp_size, args.dp_size, args.nnodes)
        front = node == 0
        return cls(layout, node, layout.node_ranks(node, args.base_gpu_id, args.gpu_id_step), front,
                   front and layout.dp > 1, front)

    def process_titles(self) -> list[str]:
        """The children this node spawns, as `ps` shows them."""
        titles = [f"gridserve::scheduler {r.name}" for r in self.ranks]
        titles += ["gridserve::detokenizer"] * self.detokenizer + ["gridserve::dp_controller"] * self.dp_controller
        return titles

    def describe(self) -> str:
        """One line for the start-up log."""
        ranks = ", ".join(f"{r.name} (GPU {r.gpu_id})" for r in self.ranks)
        roles = [name for name, on in (("detokenizer", self.detokenizer), ("dp_controller", self.dp_controller),
                                       ("TokenizerManager", self.tokenizer_manager)) if on]
        return f"ranks {ranks}; {', '.join(roles) or 'no front-end processes'}"


def dry_run_report(args: ServerArgs) -> str:
    """Every node's ranks (dp, pp, tp, global rank), GPUs and processes, as `gridserve serve --dry-run` prints
    them. Raises ValueError for a layout that would fail at start."""
    layout = Layout(args.tp_size, args.pp_size, args.dp_size, args.nnodes)
    lines = [f"gridserve deployment: dp {layout.dp} x pp {layout.pp} x tp {layout.tp} = {layout.world_size} ranks "
             f"on {layout.nnodes} node(s), {layout.ranks_per_node} per node; each replica is a world of "
             f"{layout.replica_size} rank(s)"]
    for node in range(layout.nnodes):
        plan = LaunchPlan.for_node(args, node)
        where = f"{args.host}:{args.port}"
        main = (f"{'gRPC' if args.grpc_mode else 'HTTP'} server + TokenizerManager on {where}" if node == 0
                else "node agent (its ranks, heartbeats with node 0) + /health on that node's --host:--port")
        lines.append(f"node {node}:")
        lines.append(f"  {'global':>6}  {'dp':>3} {'pp':>3} {'tp':>3}  {'GPU':>3}")
        for r in plan.ranks:
            io = f"  IO rank of replica {r.dp_rank}" if r.is_io_rank else ""
            lines.append(f"  {r.global_rank:>6}  {r.dp_rank:>3} {r.pp_rank:>3} {r.tp_rank:>3}  {r.gpu_id:>3}{io}")
        lines.append(f"  processes: main ({main}); " + ", ".join(plan.process_titles()))
    return "\n".join(lines)
