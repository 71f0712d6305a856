"""The one place that knows this process's parallel ranks and groups.

Layers and the scheduler call only what is here. In a replica of one rank (tp = pp = 1) init_model_parallel
returns at once: every group has size 1 and every collective is an identity, so the single-GPU path has no
distributed code in it. Each DP replica is a world of its own: these groups never span two replicas.
"""

import datetime
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gridserve import wire
from gridserve.distributed.ranks import MoESplit, RankInfo
from gridserve.distributed.ranks import moe_split as _moe_split


@dataclass
class GroupCoordinator:
    """A process group plus this rank's position in it: a device group for tensors (NCCL on GPU, gloo on
    CPU) and a gloo group for small Python objects (control messages)."""

    rank: int = 0
    size: int = 1
    ranks: tuple[int, ...] = (0,)
    device_group: object = None
    cpu_group: object = None

    @property
    def first_rank(self) -> int:
        return self.ranks[0]

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """In place, from the group's first rank."""
        if self.size > 1:
            dist.broadcast(x, src=self.first_rank, group=self.device_group)
        return x

    def broadcast_object(self, obj=None):
        """A message object from the group's first rank to all (over the CPU group), as typed msgpack: the ranks
        of a replica may sit on different nodes, and nothing that crosses a network is pickled."""
        if self.size == 1:
            return obj
        if self.is_first:
            payload = _to_bytes_tensor(obj)
            size = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            size = torch.empty(1, dtype=torch.int64)
        dist.broadcast(size, src=self.first_rank, group=self.cpu_group)
        if not self.is_first:
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(payload, src=self.first_rank, group=self.cpu_group)
        return obj if self.is_first else wire.decode(payload.numpy().tobytes())

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def send(self, tensors: list[torch.Tensor], dst: int) -> list:
        """Sends tensors to group rank dst without waiting; returns the requests to wait on before the tensors
        are reused."""
        return [dist.isend(t.contiguous(), self.ranks[dst], group=self.device_group) for t in tensors]

    def recv(self, tensors: list[torch.Tensor], src: int) -> list[torch.Tensor]:
        """Fills the given (preallocated) tensors from group rank src, in the order they were sent."""
        for t in tensors:
            dist.recv(t, self.ranks[src], group=self.device_group)
        return tensors

    def send_object_async(self, obj, dst: int) -> list[tuple]:
        """Sends a message object (typed msgpack) to group rank dst over the CPU group without waiting; returns
        (request, buffer) pairs that must stay alive until the requests complete."""
        payload = _to_bytes_tensor(obj)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        return [(dist.isend(t, self.ranks[dst], group=self.cpu_group), t) for t in (size, payload)]

    def recv_object(self, src: int):
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, self.ranks[src], group=self.cpu_group)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(payload, self.ranks[src], group=self.cpu_group)
        return wire.decode(payload.numpy().tobytes())

    def all_reduce_min(self, value: int) -> int:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


def _to_bytes_tensor(obj) -> torch.Tensor:
    return torch.frombuffer(bytearray(wire.encode(obj)), dtype=torch.uint8)


_TP = GroupCoordinator()
_PP = GroupCoordinator()
_WORLD = GroupCoordinator()
_PP_PARTITION: list[int] | None = None  # --pp-layer-partition, when given
_EP_SIZE = 1  # --ep-size: expert-parallel groups inside the TP group
_LISTENERS: list[socket.socket] = []


def get_tp_group() -> GroupCoordinator:
    return _TP


def get_pp_group() -> GroupCoordinator:
    return _PP


def get_world_group() -> GroupCoordinator:
    """Every rank of this model replica (tp * pp), for the few facts that all of them must agree on."""
    return _WORLD


def pp_layer_range(num_layers: int) -> tuple[int, int]:
    """[start, end) of the layers this pipeline stage holds."""
    from gridserve.distributed.pipeline import partition_layers

    return partition_layers(num_layers, _PP.size, _PP_PARTITION)[_PP.rank]


def moe_split() -> MoESplit:
    """This rank's place in the experts' split (expert parallelism inside the TP group)."""
    return _moe_split(_TP.rank, _TP.size, _EP_SIZE)


def tp_rank() -> int:
    return _TP.rank


def tp_size() -> int:
    return _TP.size


def init_model_parallel(rank: RankInfo, store_addr: str, device: torch.device, timeout_s: float | None = None,
                        pp_layer_partition: list[int] | None = None, ep_size: int = 1) -> None:
    """Joins the world of `rank`'s model replica (tp * pp ranks) and builds its TP and PP groups. Every replica
    meets in one TCP store at store_addr ("host:port"), served by global rank 0 on that address only, each
    under its own prefix: a replica never joins another's world."""
    global _TP, _PP, _WORLD, _PP_PARTITION, _EP_SIZE
    layout = rank.layout
    _PP_PARTITION, _EP_SIZE = pp_layer_partition, ep_size
    if layout.replica_size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    store = dist.PrefixStore(f"dp{rank.dp_rank}/", _tcp_store(store_addr, rank.global_rank == 0, timeout))
    dist.init_process_group(backend, store=store, world_size=layout.replica_size, rank=rank.replica_rank,
                            timeout=timeout, device_id=device if device.type == "cuda" else None)
    # every rank must create every group, in the same order
    for ranks in layout.tp_groups():
        dev, cpu = _new_groups(ranks, backend, timeout)
        if rank.replica_rank in ranks:
            _TP = GroupCoordinator(rank.tp_rank, layout.tp, ranks, dev, cpu)
    for ranks in layout.pp_groups():
        dev, cpu = _new_groups(ranks, backend, timeout)
        if rank.replica_rank in ranks:
            _PP = GroupCoordinator(rank.pp_rank, layout.pp, ranks, dev, cpu)
    world = tuple(range(layout.replica_size))
    cpu_world = dist.group.WORLD if backend == "gloo" else dist.new_group(list(world), backend="gloo",
                                                                          timeout=timeout)
    _WORLD = GroupCoordinator(rank.replica_rank, layout.replica_size, world, dist.group.WORLD, cpu_world)


def _tcp_store(addr: str, serve: bool, timeout: datetime.timedelta | None) -> dist.TCPStore:
    """The rendezvous store; the server listens on addr's host alone (torch's own binds every interface)."""
    host, port = addr.rsplit(":", 1)
    wait = timeout or datetime.timedelta(seconds=300)
    if not serve:
        return dist.TCPStore(host, int(port), is_master=False, timeout=wait)
    listener = socket.create_server((host, int(port)), backlog=1024)
    _LISTENERS.append(listener)  # the store serves on this socket for the life of the process
    return dist.TCPStore(host, int(port), is_master=True, timeout=wait, wait_for_workers=False,
                         master_listen_fd=listener.fileno())


def _new_groups(ranks: tuple[int, ...], backend: str, timeout):
    dev = dist.new_group(list(ranks), backend=backend, timeout=timeout)
    cpu = dev if backend == "gloo" else dist.new_group(list(ranks), backend="gloo", timeout=timeout)
    return dev, cpu


def destroy_model_parallel() -> None:
    global _TP, _PP, _WORLD, _PP_PARTITION, _EP_SIZE
    _TP, _PP, _WORLD, _PP_PARTITION, _EP_SIZE = GroupCoordinator(), GroupCoordinator(), GroupCoordinator(), None, 1
    if dist.is_initialized():
        dist.destroy_process_group()
