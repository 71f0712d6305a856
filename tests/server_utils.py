"""Start a real `gridserve serve` process and inspect its process tree; time how long a server stalls."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import httpx

from gridserve.ipc import free_port as gridserve_free_port

GRIDSERVE = os.path.join(os.path.dirname(sys.executable), "gridserve")


def free_port() -> int:
    return gridserve_free_port()


class ServerProcess:
    """`gridserve serve ARGS` on a free local port, or in network namespace `netns` on host:port (a node of a
    multi-node deployment); returns once its log says it is ready (wait=False: at once)."""

    def __init__(self, *args: str, grpc: bool = False, timeout: float = 240, netns: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None, wait: bool = True):
        self.port = port or free_port()
        self.log_path = f"/tmp/gridserve-test-{host}-{self.port}-{os.getpid()}-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        cmd = [GRIDSERVE, "serve", "--host", host, "--port", str(self.port), "--no-show-progress",
               "--max-total-tokens", "4096", *(["--grpc-mode"] if grpc else []), *args]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.ready_wall_s = 0.0  # seconds from exec to the "ready in" line, as seen from here
        self.url = f"http://{host}:{self.port}"
        if wait:
            self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if "ready in" in self.output():
                self.ready_wall_s = time.monotonic() - self.started
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def startup_seconds(self) -> float:
        line = next(ln for ln in self.output().splitlines() if "ready in" in ln)
        return float(line.split("ready in")[1].split()[0])

    def descendants(self) -> list[int]:
        return descendants(self.proc.pid)

    def child_pid(self, title: str) -> int:
        for pid in self.descendants():
            if title in cmdline(pid):
                return pid
        raise LookupError(title)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def health(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def health_body(url: str) -> tuple[int, str]:
    """/health's status and body; (0, "") when nothing answers."""
    try:
        r = httpx.get(f"{url}/health", timeout=2)
    except httpx.HTTPError:
        return 0, ""
    return r.status_code, r.text


def assert_killing_ends_deployment(server: "ServerProcess", role: str, within: float = 10.0) -> None:
    """SIGKILLs the child process titled `gridserve::{role}` and checks the whole deployment is gone within
    `within` seconds: the server exits non-zero naming that role, and no process of its tree is left."""
    tree = server.descendants()
    victim = server.child_pid(f"gridserve::{role}")
    start = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    server.proc.wait(within)
    assert server.proc.returncode != 0
    assert role in server.output()
    assert wait_gone(tree, max(0.1, within - (time.monotonic() - start))) == []
    assert health(server.url) == 0


def listening_addresses(pids: list[int]) -> set[str]:
    """The local addresses (without ports) on which any of `pids` has a listening TCP socket (`ss`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
    wanted = {f"pid={p}," for p in pids}
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if any(w in line for w in wanted)}


def metrics(url: str) -> dict[str, float]:
    """The first sample of every /metrics series by name (with dp 1, the only one)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            out.setdefault(line.split("{")[0], float(line.rsplit(" ", 1)[1]))
    return out


def ipc_dir(server: "ServerProcess") -> str:
    """The deployment's IPC directory, from its start-up log line."""
    return server.output().split("IPC directory ")[1].split()[0]


class InFlight:
    """One streaming completion, read in a thread: the request in flight at the moment of a fault. `outcome()`
    says how it ended: "done" (finished normally), "error: <message>" (an error event, or a non-200 status), or
    "connection: <exception>" (the connection dropped)."""

    def __init__(self, url: str, prompt: list[int], max_tokens: int, setup: Callable[[], None] | None = None,
                 **extra):
        """setup: run first in the request's thread (to enter a network namespace, say)."""
        self.setup = setup
        self.events: list[str] = []
        self.status: int | None = None
        self.exc: str | None = None
        self.streaming = threading.Event()
        self._leave = threading.Event()
        body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True, **extra}
        self._thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            if self.setup is not None:
                self.setup()
            # the read timeout only guards against a hang of the test itself: each fault's bound is checked apart
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line:
                        self.events.append(line)
                        self.streaming.set()
                    if self._leave.is_set():
                        return  # closes the connection: the server aborts the request
        except (httpx.HTTPError, OSError) as e:
            self.exc = repr(e)
        finally:
            self.streaming.set()

    def wait_streaming(self, timeout: float) -> None:
        """Returns once the first token arrived (the request runs), or raises."""
        if not self.streaming.wait(timeout) or not self.events:
            raise AssertionError(f"no token within {timeout} s: status {self.status}, {self.exc}, {self.events[-2:]}")

    def join(self, timeout: float) -> bool:
        """True once the stream has ended, within `timeout` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def leave(self, timeout: float) -> bool:
        """Closes the stream as a client that goes away does; True once it is closed."""
        self._leave.set()
        return self.join(timeout)

    def running(self) -> bool:
        """True while the stream is open and has not ended."""
        return self._thread.is_alive() and not (self.events and self.events[-1] == "data: [DONE]")

    def outcome(self) -> str:
        if self.exc is not None:
            return f"connection: {self.exc}"
        if self.status != 200:
            return f"error: status {self.status}"
        errors = [e for e in self.events if e.startswith("data: {") and '"error"' in e[:20]]
        if errors:
            return f"error: {json.loads(errors[-1][len('data: '):])['error']['message']}"
        return "done" if self.events and self.events[-1] == "data: [DONE]" else f"cut: {self.events[-1:]}"


def longest_stall(busy: threading.Thread, probe: Callable[[], None], pause: float = 0.05) -> float:
    """Calls probe() every `pause` s while `busy` runs; returns the longest time from one answered probe to the next,
    the pause taken off. A probe that could not even start (the whole process stalled: a thread holding the GIL)
    counts too, which timing each probe alone would miss."""
    worst, last = 0.0, time.monotonic()
    while busy.is_alive():
        probe()
        now = time.monotonic()
        worst, last = max(worst, now - last), now
        time.sleep(pause)
        last += pause
    return worst
