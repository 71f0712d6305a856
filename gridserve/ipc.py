"""ZMQ endpoints between the processes of one deployment: ipc:// sockets in a private temp directory."""

import os
import shutil
import socket
import tempfile
from dataclasses import dataclass

import zmq


@dataclass
class PortArgs:
    ipc_dir: str
    scheduler_input: str  # TokenizerManager -> scheduler (tp0 of pp stage 0)
    detokenizer_input: str  # scheduler -> detokenizer
    tokenizer_input: str  # detokenizer -> TokenizerManager
    dist_init_method: str  # torch.distributed rendezvous of the ranks

    @classmethod
    def create(cls, dist_init_addr: str | None = None) -> "PortArgs":
        d = tempfile.mkdtemp(prefix="gridserve-")  # mkdtemp makes it mode 0700: only this user can connect
        dist = f"tcp://{dist_init_addr}" if dist_init_addr else f"tcp://127.0.0.1:{_free_port()}"
        return cls(d, f"ipc://{d}/scheduler", f"ipc://{d}/detokenizer", f"ipc://{d}/tokenizer", dist)

    def cleanup(self) -> None:
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def exists(self) -> bool:
        return os.path.isdir(self.ipc_dir)


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
