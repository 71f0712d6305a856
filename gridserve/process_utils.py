"""Process plumbing shared by the launcher and its children: titles, dying with the parent, killing trees."""

import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
import time

import setproctitle

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
PEER_GONE_EXIT = 3  # a rank's exit status when a peer rank went away under it: a consequence, never the cause


def init_child_process(title: str, log_level: str) -> int:
    """Called first thing in every spawned child. Returns the parent's pid, which the child's loop watches."""
    setproctitle.setproctitle(f"gridserve::{title}")
    logging.basicConfig(level=log_level.upper(), format=f"[%(asctime)s {title}] %(levelname)s %(message)s")
    try:  # the kernel kills us if the parent dies (best effort; the loops also poll the parent pid)
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    return os.getppid()


def freeze_startup_objects() -> None:
    """Called once a process has built what it keeps for life (torch, the model, the tokenizer, the HTTP stack):
    frozen, the garbage collector never walks those objects again. A full collection over them took ~95 ms on
    the imports alone (170,000 objects), a stall for every request in flight whenever one runs; the final one at
    exit took seconds on a busy CPU. (No collection first: it would cost a third of a second of start-up to free a
    handful of objects.)"""
    gc.freeze()


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        hint = " (exit code -9; possibly the out-of-memory killer)" if code == -signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    if code == PEER_GONE_EXIT:
        return f"exited with code {code} (a peer rank was gone)"
    return f"exited with code {code}"


def terminate_processes(procs: list, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after `timeout` seconds."""
    for p in procs:
        if p.is_alive():
            p.terminate()
            with contextlib.suppress(OSError):  # a stopped process (SIGSTOP) acts on the SIGTERM only once resumed
                os.kill(p.pid, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(1.0)


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (R, S, D, T stopped, t traced, Z...); "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def spawn_without_main():
    """Start spawned children without re-running the parent's __main__ script in them.

    Every child target lives in gridserve's own modules, so the child never needs the user's script; and
    re-running it would start a second Engine inside the child whenever the script lacks an
    `if __name__ == "__main__":` guard."""
    main = sys.modules["__main__"]
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if hasattr(main, k)}
    for k in saved:
        setattr(main, k, None) if k == "__spec__" else delattr(main, k)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)
