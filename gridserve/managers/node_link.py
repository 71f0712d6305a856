"""The node link: node 0's launcher and every other node's exchange heartbeats over one ZMQ connection, so a
node that never comes, or is lost later, ends the deployment on every node with a message that names it.

Node 0 runs a NodeHub (a ROUTER bound to its own address); node k runs a NodeAgent (a DEALER). Node k sends
"ready" once its ranks are up (with their scheduler_info), then a heartbeat every HEARTBEAT_S; node 0 answers
each heartbeat. A silence longer than the timeout (--dist-timeout) or a "failed" message marks the node lost; a
"stop" from node 0 carries the reason when the deployment ends on a failure. Messages are typed (wire.py).
"""

import logging
import threading
import time

import zmq

from gridserve import wire
from gridserve.messages import NodeMessage

logger = logging.getLogger(__name__)
HEARTBEAT_S = 1.0


class NodeHub:
    """Node 0's side: waits for every node's "ready", then watches their heartbeats."""

    def __init__(self, endpoint: str, expected: dict[int, list[str]], timeout_s: float):
        self.expected = expected  # node rank -> the names of its ranks
        self.timeout_s = timeout_s
        self.ready: dict[int, NodeMessage] = {}
        self.last_seen: dict[int, float] = {}
        self.lost: str | None = None  # why the first node counts as lost
        self._ids: dict[int, bytes] = {}
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gridserve-node-hub", daemon=True)
        self._thread.start()

    def describe(self, node: int) -> str:
        msg = self.ready.get(node)
        where = f" at {msg.address}" if msg else ""
        return f"node {node}{where} (ranks {', '.join(self.expected[node])})"

    def missing(self) -> list[int]:
        return [n for n in self.expected if n not in self.ready]

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(200):
                try:
                    ident, data = self._sock.recv_multipart()
                    msg = wire.decode(data)
                except (ValueError, TypeError, zmq.ZMQError) as e:
                    logger.warning("node link: a malformed message was dropped (%s)", e)
                    continue
                if isinstance(msg, NodeMessage) and msg.node_rank in self.expected:
                    self._handle(ident, msg)
            self._check_silence()

    def _handle(self, ident: bytes, msg: NodeMessage) -> None:
        node, now = msg.node_rank, time.monotonic()
        with self._lock:
            self._ids[node] = ident
            self.last_seen[node] = now
            if msg.kind == "ready" and node not in self.ready:
                self.ready[node] = msg
                logger.info("node %d joined from %s: ranks %s", node, msg.address, ", ".join(msg.ranks))
            elif msg.kind == "failed" and self.lost is None:
                self.lost = f"{self.describe(node)} failed: {msg.reason}"
        if msg.kind == "heartbeat":
            self._send(node, NodeMessage("heartbeat", 0))

    def _check_silence(self) -> None:
        now = time.monotonic()
        with self._lock:
            for node, seen in self.last_seen.items():
                if self.lost is None and now - seen > self.timeout_s:
                    self.lost = f"{self.describe(node)} lost: no heartbeat for {now - seen:.0f} s"

    def _send(self, node: int, msg: NodeMessage) -> None:
        try:
            self._sock.send_multipart([self._ids[node], wire.encode(msg)], zmq.NOBLOCK)
        except (KeyError, zmq.ZMQError):
            pass

    def stale(self, older_than_s: float = 2.5 * HEARTBEAT_S) -> list[int]:
        """Nodes not heard from lately: the likely cause when a rank of node 0 fails in a collective."""
        now = time.monotonic()
        return [n for n, seen in self.last_seen.items() if now - seen > older_than_s]

    def close(self, reason: str = "") -> None:
        """Tells every node to stop (with the failure that ends the deployment, if any) and closes the link; once."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(2)
        for node in list(self._ids):  # the thread is gone: this thread may use the socket now
            self._send(node, NodeMessage("stop", 0, reason=reason))
        self._ctx.destroy(linger=500)


class NodeAgent:
    """Node k's side: says when its ranks are ready, beats, and watches node 0's answers."""

    def __init__(self, endpoint: str, node_rank: int, address: str, timeout_s: float):
        self.node_rank, self.address, self.timeout_s = node_rank, address, timeout_s
        self.last_seen = time.monotonic()  # node 0 counts as seen at start: the timeout bounds the first answer
        self.heard = False
        self.stopped = False  # node 0 said stop
        self.stop_reason = ""  # the failure that made node 0 stop, if any
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 500)  # a "failed" sent on the way out still gets through
        self._sock.connect(endpoint)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gridserve-node-agent", daemon=True)
        self._thread.start()

    def send(self, msg: NodeMessage) -> None:
        with self._lock:
            self._sock.send(wire.encode(msg))

    def ready(self, ranks: list[str], infos: list[dict]) -> None:
        self.send(NodeMessage("ready", self.node_rank, self.address, ranks, infos))

    def failed(self, reason: str) -> None:
        self.send(NodeMessage("failed", self.node_rank, self.address, reason=reason))

    def silence_s(self) -> float:
        return time.monotonic() - self.last_seen

    def _loop(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self.send(NodeMessage("heartbeat", self.node_rank, self.address))
                next_beat = now + HEARTBEAT_S
            with self._lock:  # ZMQ sockets are not thread-safe: ready() and failed() send from other threads
                data = self._sock.recv() if self._sock.poll(100) else None
            if data is not None:
                try:
                    msg = wire.decode(data)
                except (ValueError, TypeError):
                    continue
                if isinstance(msg, NodeMessage):
                    self.last_seen, self.heard = time.monotonic(), True
                    if msg.kind == "stop":
                        self.stopped, self.stop_reason = True, msg.reason

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._ctx.destroy(linger=500)
