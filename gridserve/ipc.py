"""ZMQ endpoints between the processes of one deployment: ipc:// sockets in a private temp directory."""

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass

import zmq


@dataclass
class ReplicaPorts:
    """The endpoints of one DP replica: a tp x pp world of its own, which never joins another's."""

    scheduler_input: str  # requests -> this replica's IO rank (tp 0 of pp stage 0)
    dist_init_method: str  # torch.distributed rendezvous of this replica's ranks


@dataclass
class PortArgs:
    """The deployment's endpoints (one TokenizerManager, one detokenizer, the DP controller when dp > 1) and
    each replica's own."""

    ipc_dir: str
    tokenizer_input: str  # detokenizer -> TokenizerManager
    detokenizer_input: str  # every replica's IO rank -> detokenizer
    controller_input: str  # TokenizerManager -> DP controller, and the replicas' load reports (dp > 1)
    replicas: list[ReplicaPorts]

    @classmethod
    def create(cls, dp_size: int = 1, dist_init_addr: str | None = None) -> "PortArgs":
        d = tempfile.mkdtemp(prefix="gridserve-")  # mkdtemp makes it mode 0700: only this user can connect
        replicas = [ReplicaPorts(f"ipc://{d}/scheduler-dp{r}", _dist_init_method(dist_init_addr, r))
                    for r in range(dp_size)]
        return cls(d, f"ipc://{d}/tokenizer", f"ipc://{d}/detokenizer", f"ipc://{d}/dp_controller", replicas)

    @property
    def request_input(self) -> str:
        """Where the TokenizerManager sends requests: the DP controller, or the only replica."""
        return self.controller_input if len(self.replicas) > 1 else self.replicas[0].scheduler_input

    def cleanup(self) -> None:
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def exists(self) -> bool:
        return os.path.isdir(self.ipc_dir)


def _dist_init_method(dist_init_addr: str | None, dp_rank: int) -> str:
    """Replica r's rendezvous: --dist-init-addr's port + r (every node can work it out alone), else a free port."""
    if not dist_init_addr:
        return f"tcp://127.0.0.1:{_free_port()}"
    host, port = dist_init_addr.rsplit(":", 1)
    return f"tcp://{host}:{int(port) + dp_rank}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zmq_socket(ctx: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
    """PULL sockets bind (each has one owner), PUSH sockets connect; no message is dropped at exit."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if kind == zmq.PULL:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock


def recv_all(sock: zmq.Socket, timeout_ms: int = 0) -> list:
    """Every message waiting on `sock`, waiting up to timeout_ms for the first one."""
    msgs = []
    if timeout_ms and not sock.poll(timeout_ms):
        return msgs
    while True:
        try:
            msgs.append(sock.recv_pyobj(zmq.NOBLOCK))
        except zmq.Again:
            return msgs
