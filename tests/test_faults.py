"""The fault matrix (issue 17): each fault, on each topology, with a request in flight, ends within a bound and
leaves nothing behind: every process of the tree gone, the IPC directory removed wherever the main process lives to
clean up, and the request ended (an error event naming the cause; a dropped connection when the main process itself
dies), never hung. A fault that ends the deployment turns /health to 503 naming its cause first, then exits 1.

Faults: SIGKILL of a rank, of the detokenizer, of the DP controller (dp only); SIGSTOP of a rank (the watchdog,
--watchdog-timeout 3); SIGTERM of the main process (exit 0, open streams end with an error event); SIGKILL of the
main process (the children die with it). Every cell and where it is covered; `long` marks what only `make
reliability` (--long) runs, where test_fault also takes every rank of each topology, and every cell twice.

| topology                | fault          | test                                                                      |
| ----------------------- | -------------- | ------------------------------------------------------------------------- |
| single process          | SIGKILL rank   | test_server.py::test_killed_scheduler_takes_the_deployment_down           |
| (tp 1, pp 1, dp 1)      | SIGKILL detok. | test_fault[single-kill-detokenizer]                                       |
|                         | SIGSTOP rank   | test_server.py::test_watchdog_ends_a_deployment_whose_rank_is_stopped     |
|                         | SIGTERM main   | test_server.py::test_sigterm_is_a_clean_shutdown                          |
|                         | SIGKILL main   | test_server.py::test_children_die_with_a_killed_main_process (no request  |
|                         |                | in flight); long: test_fault[single-kill-main]                            |
| tp 2 x pp 2             | SIGKILL rank   | test_fault[tp2pp2-kill-rank-dp0pp1tp1] (not an IO rank); also tp 3: tp1   |
|                         |                | (test_tp_server.py), pp 4: pp2 (test_pp_server.py)                        |
|                         | SIGKILL detok. | test_fault[tp2pp2-kill-detokenizer]                                       |
|                         | SIGSTOP rank   | test_fault[tp2pp2-stop-rank-dp0pp0tp1]                                    |
|                         | SIGTERM main   | test_fault[tp2pp2-term-main]                                              |
|                         | SIGKILL main   | test_fault[tp2pp2-kill-main]                                              |
| dp 2                    | SIGKILL rank   | test_dp_server.py::test_dp2_tp2_equals_one_replica_then_killing_ranks_... |
|                         |                | (dp 2 x tp 2: dp0 pp0 tp1; dp 2 x pp 2: dp1 pp1 tp0; no request in        |
|                         |                | flight); long: test_fault[dp2-kill-rank-*]                                |
|                         | SIGKILL detok. | test_fault[dp2-kill-detokenizer]                                          |
|                         | SIGKILL DP ctl | test_dp_server.py::test_cache_aware_keeps_prefixes_warm_where_round_ro... |
|                         |                | (no request in flight); long: test_fault[dp2-kill-dp-controller]          |
|                         | SIGSTOP rank   | test_fault[dp2-stop-rank-dp1pp0tp0]                                       |
|                         | SIGTERM main   | test_fault[dp2-term-main]                                                 |
|                         | SIGKILL main   | test_fault[dp2-kill-main]                                                 |
| two nodes (namespaces)  | SIGKILL rank   | long: test_two_node_fault[node1-kill-rank]; a whole node killed:          |
| pp 2, one rank each,    |                | test_multinode.py::test_dp2_across_two_nodes_then_node1_is_killed,        |
| unless named otherwise  |                | test_pp2_across_two_nodes_then_node0_is_killed; a link down:              |
|                         |                | test_tp2_and_dp2_tp2_across_two_nodes_then_a_link_goes_down (tp 2)        |
|                         | SIGKILL detok. | long: test_two_node_fault[node0-kill-detokenizer]                         |
|                         | SIGSTOP rank   | node 1's: test_multinode.py::test_a_stopped_rank_on_node1_ends_both_nodes;|
|                         |                | node 0's: long: test_two_node_fault[node0-stop-rank]                      |
|                         | SIGTERM main   | long: test_two_node_fault[node0-term], [node1-term]                       |
|                         | SIGKILL main   | long: test_two_node_fault[node0-kill-main], [node1-kill-main]             |

Each server start covers one cell (a deployment that a fault ended cannot be reused); the next cell's server starts
while the current cell waits out its fault, since a start is CPU-bound and a fault mostly waiting.
"""

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.netns_utils import can_make_namespaces, enter_namespace, namespace_pair
from tests.server_utils import InFlight, ServerProcess, descendants, health_body, ipc_dir, wait_gone
from tests.test_multinode import TIMEOUT, TwoNodes
from tests.tiny_models import tiny_server_args

TOPOLOGIES = {"single": (), "tp2pp2": ("--tp", "2", "--pp", "2"), "dp2": ("--dp", "2")}
RANKS = {"single": ["dp0 pp0 tp0"], "tp2pp2": [f"dp0 pp{p} tp{t}" for p in (0, 1) for t in (0, 1)],
         "dp2": ["dp0 pp0 tp0", "dp1 pp0 tp0"]}
# Short enough to keep the SIGSTOP cells cheap; long enough that a rank slowed down by a contended CPU (an idle
# loop turns every 50 ms, a busy one every decode step) never looks hung.
WATCHDOG_S = 3
PROMPT = [5, 17, 42, 99, 150]  # token ids in the tiny model's vocabulary
# The request runs for many seconds, so the fault always finds it running (on a contended CI machine 480 tokens, the
# tiny model's own context, once ended before the fault came).
CONTEXT = ("--context-length", "4096")
MAX_TOKENS = 4000
# Bounds from the fault to the end of everything, with room for a contended 2-core machine: a death is seen at
# once, the front end answers with errors for 2 s (DEATH_GRACE_S), then the children get SIGTERM.
DEATH_BOUND_S = 20
STOP_BOUND_S = WATCHDOG_S + 20


@dataclasses.dataclass(frozen=True)
class Cell:
    topology: str
    fault: str  # kill-rank, kill-detokenizer, kill-dp-controller, stop-rank, term-main, kill-main
    victim: str = ""  # the child's title after `gridserve::`, for the faults of one child

    def __str__(self) -> str:
        return "-".join(filter(None, (self.topology, self.fault, self.victim.replace("scheduler ", "")
                                      .replace(" ", ""))))


def _cells(long: bool) -> list[Cell]:
    """Each fault kind on each topology once (`make test`); with --long, every rank, twice."""
    cells = [Cell("single", "kill-detokenizer"),
             Cell("tp2pp2", "kill-rank", "scheduler dp0 pp1 tp1"), Cell("tp2pp2", "kill-detokenizer"),
             Cell("tp2pp2", "stop-rank", "scheduler dp0 pp0 tp1"), Cell("tp2pp2", "term-main"),
             Cell("tp2pp2", "kill-main"),
             Cell("dp2", "kill-detokenizer"), Cell("dp2", "stop-rank", "scheduler dp1 pp0 tp0"),
             Cell("dp2", "term-main"), Cell("dp2", "kill-main")]
    if not long:
        return cells
    full = []
    for topology, ranks in RANKS.items():
        for fault in ("kill-rank", "stop-rank"):
            full += [Cell(topology, fault, f"scheduler {r}") for r in ranks]
        full += [Cell(topology, fault) for fault in ("kill-detokenizer", "term-main", "kill-main")]
    full.append(Cell("dp2", "kill-dp-controller"))
    return full * 2


# Two nodes, pp 2 (rank dp0 pp0 tp0 on node 0, dp0 pp1 tp0 on node 1): the faults that test_multinode.py leaves out,
# with --long only. Each: node 0's exit status, node 1's, what the request in flight's error (node 0's reason) says,
# what node 1's log says ({pid}: the victim's).
NODE_CELLS = {
    "node1-kill-rank": (1, 1, "node 1 at 192.0.2.2 (ranks dp0 pp1 tp0) failed: scheduler dp0 pp1 tp0 (pid {pid}) was "
                              "killed by SIGKILL", "deployment stopped: scheduler dp0 pp1 tp0 (pid {pid}) was killed"),
    "node1-kill-main": (1, -9, "node 1 at 192.0.2.2 (ranks dp0 pp1 tp0) ", ""),
    "node1-term": (1, 0, "node 1 at 192.0.2.2 (ranks dp0 pp1 tp0) failed: node 1 was stopped by SIGTERM", ""),
    "node0-term": (0, 0, "(SIGTERM)", "node 0 stopped the deployment"),
    "node0-kill-main": (-9, 1, "", "deployment stopped: node 0 at 192.0.2.1:5000 lost"),
    "node0-stop-rank": (1, 1, f"scheduler dp0 pp0 tp0 made no progress for over {WATCHDOG_S} s (--watchdog-timeout): "
                              "stopped", "node 0 stopped the deployment: scheduler dp0 pp0 tp0 made no progress"),
    "node0-kill-detokenizer": (1, 1, "detokenizer (pid {pid}) was killed by SIGKILL",
                               "deployment stopped: node 0 stopped the deployment: detokenizer (pid {pid}) was killed"),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    long = metafunc.config.getoption("--long")
    if "cell" in metafunc.fixturenames:
        metafunc.parametrize("cell", _cells(long), ids=str)
    if "node_cell" in metafunc.fixturenames:
        metafunc.parametrize("node_cell", list(NODE_CELLS) if long else [])


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> tuple[str, ...]:
    # 4 heads, 2 KV heads, 3 layers: splits over tp 2 and pp 2
    return (*tiny_server_args("qwen3", tmp_path_factory.mktemp("tiny-qwen3")), *CONTEXT)


class _Starter:
    """Hands each cell its own server, and starts the next cell's while the current cell runs: a start is CPU-bound
    and the current cell mostly waits (the front end's grace period, the watchdog timeout, the teardown)."""

    def __init__(self, model_args: tuple[str, ...]):
        self.model_args = model_args
        self.ahead: tuple[tuple[str, ...], ServerProcess] | None = None

    def args(self, cell: Cell) -> tuple[str, ...]:
        watchdog = ("--watchdog-timeout", str(WATCHDOG_S)) if cell.fault == "stop-rank" else ()
        return (*self.model_args, *TOPOLOGIES[cell.topology], *watchdog)

    def take(self, cell: Cell) -> ServerProcess:
        if self.ahead is not None and self.ahead[0] == self.args(cell):
            server, self.ahead = self.ahead[1], None
            try:
                server._wait_ready(240)
            except BaseException:
                server.stop()
                raise
            return server
        self.close()
        return ServerProcess(*self.args(cell))

    def start_ahead(self, cell: Cell | None) -> None:
        if cell is not None and self.ahead is None:
            self.ahead = (self.args(cell), ServerProcess(*self.args(cell), wait=False))

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead[1].stop()
            self.ahead = None


@pytest.fixture(scope="module")
def starter(model_args):
    s = _Starter(model_args)
    yield s
    s.close()


def _next_cell(request: pytest.FixtureRequest) -> Cell | None:
    """The cell of the test that runs right after this one, if it is one of this module's."""
    items = request.session.items
    i = items.index(request.node)
    following = items[i + 1] if i + 1 < len(items) else None
    callspec = getattr(following, "callspec", None)
    return callspec.params.get("cell") if callspec is not None and following.module is request.module else None


def test_fault(cell: Cell, starter: _Starter, request: pytest.FixtureRequest, capsys) -> None:
    server = starter.take(cell)
    tree = server.descendants()
    try:
        line = _inject(server, cell, tree, lambda: starter.start_ahead(_next_cell(request)))
        with capsys.disabled():
            print(f"\n[fault matrix] {cell}: {line}", end="")
    finally:
        for pid in tree:  # a failed check leaves nothing running (a stopped rank ignores SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.stop()


def _inject(server: ServerProcess, cell: Cell, tree: list[int], meanwhile: Callable[[], None]) -> str:
    """Starts a request, injects the fault while it runs, checks how everything ends; returns a summary. Calls
    `meanwhile` once the request runs, before the fault."""
    ipc = ipc_dir(server)
    pin = {}
    if cell.topology == "dp2" and cell.victim.startswith("scheduler"):  # on the replica of the rank that fails
        pin = {"routed_dp_rank": int(cell.victim.split()[1][2:])}
    request = InFlight(server.url, PROMPT, MAX_TOKENS, **pin)
    request.wait_streaming(60)
    meanwhile()
    victim = server.child_pid(f"gridserve::{cell.victim}") if cell.victim else None
    assert request.running(), f"the request ended before the fault: {request.outcome()}"
    start = time.monotonic()
    if cell.fault == "kill-main":
        server.proc.kill()
        assert wait_gone(tree, DEATH_BOUND_S) == [], "children outlived the main process"
        gone = time.monotonic() - start
        assert request.join(DEATH_BOUND_S), "the request in flight hangs"
        assert request.outcome().startswith("connection"), request.outcome()
        return f"children gone in {gone:.1f} s; request: {request.outcome()[:60]}"
    if cell.fault == "term-main":
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(DEATH_BOUND_S)
        exited = time.monotonic() - start
        assert server.proc.returncode == 0, server.output()[-3000:]
        assert wait_gone(tree, DEATH_BOUND_S) == []
        gone = time.monotonic() - start
        assert request.join(5), "the open stream hangs"
        assert request.outcome().startswith("error: the server is shutting down") and "SIGTERM" in request.outcome()
        assert request.events[-1] == "data: [DONE]"
        assert not os.path.exists(ipc), "IPC directory left behind"
        return f"exit 0 in {exited:.1f} s, tree gone in {gone:.1f} s; stream: {request.outcome()}"
    role = {"kill-detokenizer": "detokenizer", "kill-dp-controller": "dp_controller"}.get(cell.fault, cell.victim)
    victim = victim or server.child_pid(f"gridserve::{role}")
    os.kill(victim, signal.SIGSTOP if cell.fault == "stop-rank" else signal.SIGKILL)
    bound = STOP_BOUND_S if cell.fault == "stop-rank" else DEATH_BOUND_S
    # the reason names the victim first: a stopped rank's peers stall with it, but are not the cause
    why = f"{role} made no progress" if cell.fault == "stop-rank" else f"{role} (pid {victim}) was killed by SIGKILL"
    # /health turns 503 with the reason before the server exits; never a 200 once the fault was seen
    body = ""
    while server.proc.poll() is None and time.monotonic() - start < bound:
        status, body = health_body(server.url)
        if status == 503:
            break
        assert status == 200, (status, body)
        time.sleep(0.05)
    unhealthy = time.monotonic() - start
    assert why in body, body
    if cell.fault == "stop-rank":
        assert unhealthy >= WATCHDOG_S
    assert request.join(bound), "the request in flight hangs"
    assert request.outcome().startswith("error: ") and role in request.outcome(), request.outcome()
    server.proc.wait(max(1.0, bound - (time.monotonic() - start)))
    exited = time.monotonic() - start
    assert server.proc.returncode == 1
    assert f"deployment stopped: {role}" in server.output(), server.output()[-3000:]
    assert wait_gone(tree, max(1.0, bound - (time.monotonic() - start))) == [], "orphans"
    gone = time.monotonic() - start
    assert not os.path.exists(ipc), "IPC directory left behind"
    return f"503 after {unhealthy:.1f} s, exit 1 in {exited:.1f} s, tree gone in {gone:.1f} s"


@pytest.mark.skipif(can_make_namespaces() is not None, reason=str(can_make_namespaces()))
def test_two_node_fault(node_cell: str, model_args, capsys) -> None:
    """A fault on node 0 or node 1 of a pipeline across two namespaced nodes, with a request in flight: both nodes
    end with the expected status and message, the request ends, and no process is left on either node."""
    node, fault = int(node_cell[4]), node_cell[6:]
    rc0, rc1, reason0, log1 = NODE_CELLS[node_cell]
    watchdog = ("--watchdog-timeout", str(WATCHDOG_S)) if fault == "stop-rank" else ()
    with namespace_pair() as ns:
        pair = TwoNodes(ns, *model_args, "--pp", "2", *watchdog)
        trees: list[int] = []
        try:
            pair.wait_ready()
            trees = [p for n in pair.nodes for p in (n.proc.pid, *descendants(n.proc.pid))]
            ipcs = [ipc_dir(n) for n in pair.nodes]
            request = InFlight(pair.url, PROMPT, MAX_TOKENS, setup=lambda: enter_namespace(ns[0]))
            request.wait_streaming(60)
            target, pid = pair.nodes[node], 0
            start = time.monotonic()
            if fault in ("kill-main", "term"):
                target.proc.send_signal(signal.SIGKILL if fault == "kill-main" else signal.SIGTERM)
            else:
                pid = target.child_pid("gridserve::detokenizer" if fault == "kill-detokenizer"
                                       else f"gridserve::scheduler dp0 pp{node} tp0")
                os.kill(pid, signal.SIGSTOP if fault == "stop-rank" else signal.SIGKILL)
            for n in pair.nodes:  # the heartbeats' silence (--dist-timeout) is the slowest way a node learns
                n.proc.wait(TIMEOUT + 20)
            exited = time.monotonic() - start
            assert [n.proc.returncode for n in pair.nodes] == [rc0, rc1], [n.output()[-2000:] for n in pair.nodes]
            assert wait_gone(trees, 10) == [], "orphans"
            gone = time.monotonic() - start
            assert request.join(10), "the request in flight hangs"
            if rc0 == -9:
                assert request.outcome().startswith("connection"), request.outcome()
            else:
                assert reason0.format(pid=pid) in request.outcome(), request.outcome()
            assert log1.format(pid=pid) in pair.nodes[1].output(), pair.nodes[1].output()[-3000:]
            for n, ipc in zip(pair.nodes, ipcs, strict=True):  # where a node's main process lived to clean up
                assert n.proc.returncode == -9 or not os.path.exists(ipc), f"{ipc} left behind"
            with capsys.disabled():
                print(f"\n[fault matrix] two nodes, {node_cell}: exits {rc0}, {rc1} in {exited:.1f} s, trees gone in "
                      f"{gone:.1f} s; request: {request.outcome()[:100]}", end="")
        finally:
            for p in trees:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            pair.stop()
