"""ZMQ endpoints between the processes of one deployment, and the channels that carry messages over them.

On one node every endpoint is an ipc:// socket in a private temp directory, and messages are pickled. With
several nodes the processes of node 0 also listen on tcp:// endpoints bound to node 0's own address (never
0.0.0.0) for the ranks of the other nodes, and every message is typed msgpack (`wire.py`), never pickle: a
network peer must not be able to make a process run code. The ports, from --dist-init-addr's port P:
P the torch.distributed store, P+1 the detokenizer, P+2 the DP controller, P+3 the node link, P+10+r the
requests of DP replica r when its IO rank lives on another node.
"""

import os
import pickle
import random
import shutil
import socket
import tempfile
from dataclasses import dataclass

import zmq

from gridserve import wire

DETOKENIZER_PORT, CONTROLLER_PORT, NODE_LINK_PORT, REPLICA_PORT = 1, 2, 3, 10  # offsets from P


@dataclass
class ReplicaPorts:
    """Where DP replica r's IO rank (tp 0 of pp stage 0) reads its requests. On node 0 it binds an ipc://
    endpoint; on another node the DP controller binds a tcp:// one on node 0 and the IO rank connects to it."""

    scheduler_input: str
    remote: bool = False

    @property
    def io_rank_binds(self) -> bool:
        return not self.remote


@dataclass
class PortArgs:
    """Every endpoint of the deployment, as seen from this node. Each DP replica is a torch.distributed world of
    its own: all replicas share one store (`dist_store`, served by global rank 0) under their own prefix."""

    ipc_dir: str
    tokenizer_input: str  # detokenizer -> TokenizerManager (node 0)
    detokenizer_input: str  # the IO ranks of node 0 -> detokenizer
    controller_input: str  # TokenizerManager -> DP controller, and node 0's load reports (dp > 1)
    replicas: list[ReplicaPorts]
    dist_store: str  # host:port of the torch.distributed store
    node_addr: str  # this node's own address: what its sockets bind, its gloo/NCCL interface
    remote_detokenizer_input: str | None = None  # the same for the IO ranks of other nodes (tcp://)
    remote_controller_input: str | None = None
    node_link: str | None = None  # node 0's hub of node heartbeats (tcp://)

    @classmethod
    def create(cls, dp_size: int = 1, dist_init_addr: str | None = None, nnodes: int = 1,
               io_rank_nodes: list[int] | None = None, node_addr: str | None = None) -> "PortArgs":
        """io_rank_nodes[r]: the node of replica r's IO rank (default: all on node 0)."""
        remove_stale_ipc_dirs()
        d = tempfile.mkdtemp(prefix=IPC_PREFIX)  # mkdtemp makes it mode 0700: only this user can connect
        with open(os.path.join(d, OWNER_FILE), "w") as f:
            f.write(str(os.getpid()))
        if dist_init_addr:
            host, port = dist_init_addr.rsplit(":", 1)
            base = int(port)
        else:
            host, base = "127.0.0.1", free_port()
        nodes = io_rank_nodes or [0] * dp_size
        replicas = [ReplicaPorts(f"tcp://{host}:{base + REPLICA_PORT + r}", True) if nodes[r] else
                    ReplicaPorts(f"ipc://{d}/scheduler-dp{r}") for r in range(dp_size)]
        ports = cls(d, f"ipc://{d}/tokenizer", f"ipc://{d}/detokenizer", f"ipc://{d}/dp_controller", replicas,
                    f"{host}:{base}", node_addr or host)
        if nnodes > 1:
            ports.remote_detokenizer_input = f"tcp://{host}:{base + DETOKENIZER_PORT}"
            ports.remote_controller_input = f"tcp://{host}:{base + CONTROLLER_PORT}"
            ports.node_link = f"tcp://{host}:{base + NODE_LINK_PORT}"
        return ports

    @property
    def typed(self) -> bool:
        """Several nodes: every message is typed msgpack (one codec per socket, and some sockets serve both)."""
        return self.node_link is not None

    @property
    def request_input(self) -> str:
        """Where the TokenizerManager sends requests: the DP controller, or the only replica."""
        return self.controller_input if len(self.replicas) > 1 else self.replicas[0].scheduler_input

    def outputs_for(self, node_rank: int) -> tuple[str, str]:
        """(detokenizer input, controller input) for an IO rank on node `node_rank`."""
        if node_rank == 0 or not self.typed:
            return self.detokenizer_input, self.controller_input
        return self.remote_detokenizer_input, self.remote_controller_input

    def cleanup(self) -> None:
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def exists(self) -> bool:
        return os.path.isdir(self.ipc_dir)


IPC_PREFIX = "gridserve-"
OWNER_FILE = "owner.pid"  # the main process that made the directory


def remove_stale_ipc_dirs() -> list[str]:
    """Removes this user's IPC directories whose main process is gone. A main process killed with SIGKILL cannot
    remove its own; the next start does. A directory without an owner file (one being made right now, or made by
    an older gridserve) is left alone. Returns the removed paths."""
    removed = []
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if not name.startswith(IPC_PREFIX) or not os.path.isdir(path) or os.stat(path).st_uid != os.getuid():
            continue
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                owner = int(f.read())
        except (OSError, ValueError):
            continue
        if not _alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port below the kernel's ephemeral range: the ports gloo and the OS hand out on their own live in
    that range, so one chosen here is not taken by them between now and its bind."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first_ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    low = max(1024, min(20000, first_ephemeral - 2000))
    for _ in range(200):
        port = random.randrange(low, first_ephemeral)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in [{low}, {first_ephemeral}) on {host}")


class Channel:
    """One ZMQ socket that carries message objects. PULL sockets bind (each has one owner) and PUSH sockets
    connect, unless `bind` says otherwise; LINGER 0, so no message holds up an exit."""

    def __init__(self, ctx: zmq.Context, kind: int, endpoints: str | list[str | None], typed: bool = False,
                 bind: bool | None = None, block: bool = True):
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.typed = typed
        self.flags = 0 if block else zmq.NOBLOCK  # NOBLOCK: send raises zmq.Again when no peer can take it
        for endpoint in [endpoints] if isinstance(endpoints, str) else [e for e in endpoints if e]:
            self.sock.bind(endpoint) if (kind == zmq.PULL if bind is None else bind) else self.sock.connect(endpoint)

    def send(self, obj: object) -> None:
        self.sock.send(self._encode(obj), self.flags)

    def try_send(self, obj: object) -> bool:
        """Sends obj unless that would block (no peer, or its queue full): False then, and nothing sent."""
        try:
            self.sock.send(self._encode(obj), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def recv(self) -> object:
        return self._decode(self.sock.recv())

    def _encode(self, obj: object) -> bytes:
        return wire.encode(obj) if self.typed else pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)

    def _decode(self, data: bytes) -> object:
        return wire.decode(data) if self.typed else pickle.loads(data)

    def recv_all(self, timeout_ms: int = 0) -> list:
        """Every message waiting, waiting up to timeout_ms for the first one. A list sent as one message (the
        TokenizerManager's batch) arrives as its items."""
        msgs = []
        if timeout_ms and not self.sock.poll(timeout_ms):
            return msgs
        while True:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return msgs
            obj = self._decode(data)
            msgs.extend(obj) if isinstance(obj, list) else msgs.append(obj)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms))


def local_address_towards(host: str, port: int) -> str:
    """The address of this machine's interface that routes to host (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]


def interface_of(address: str) -> str | None:
    """The network interface that holds IPv4 `address` (gloo and NCCL pick their sockets by interface name)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue  # no IPv4 address
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None
