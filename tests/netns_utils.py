"""Two network namespaces joined by one veth pair, one node of a deployment in each (root only).

Addresses come from 192.0.2.0/24 (TEST-NET-1) inside the namespaces only: no default route, nothing reaches
beyond the pair. The namespaces are removed at exit, also when a test fails."""

import contextlib
import ctypes
import os
import shutil
import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx

ADDRS = ("192.0.2.1", "192.0.2.2")
_CLONE_NEWNET = 0x40000000


def can_make_namespaces() -> str | None:
    """None when this process can create network namespaces, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def namespace_pair():
    """Yields the two namespace names; node i has address ADDRS[i] on its veth end `gsv{i}-<tag>`."""
    tag = uuid.uuid4().hex[:6]
    names = (f"gs0-{tag}", f"gs1-{tag}")
    try:
        for ns in names:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", f"gsv0-{tag}", "netns", names[0], "type", "veth", "peer", "name", f"gsv1-{tag}",
            "netns", names[1])
        for i, ns in enumerate(names):
            _ip("-n", ns, "addr", "add", f"{ADDRS[i]}/24", "dev", f"gsv{i}-{tag}")
            _ip("-n", ns, "link", "set", f"gsv{i}-{tag}", "up")
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)  # (nothing should be left)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def link_down(ns: str) -> None:
    """Takes the namespace's veth end down: the other node stops hearing from it, with no reset sent."""
    for line in subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("gsv"):
            _ip("-n", ns, "link", "set", name, "down")


def enter_namespace(ns: str) -> None:
    """Moves the calling thread (only it) into network namespace `ns`."""
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
    finally:
        os.close(fd)


class NamespaceClient:
    """HTTP from inside a namespace: one worker thread that has entered it (setns changes only that thread)."""

    def __init__(self, ns: str):
        self._pool = ThreadPoolExecutor(1, initializer=enter_namespace, initargs=(ns,))
        self._lock = threading.Lock()

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        def go() -> httpx.Response:
            with httpx.Client(timeout=kwargs.pop("timeout", 60)) as client:
                return client.request(method, url, **kwargs)

        return self._pool.submit(go).result()

    def status(self, url: str) -> int:
        try:
            return self.request("GET", url, timeout=3).status_code
        except httpx.HTTPError:
            return 0

    def close(self) -> None:
        self._pool.shutdown()
