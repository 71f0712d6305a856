"""Multi-node deployments, one node per network namespace (tests/netns_utils.py): pp 2, dp 2, tp 2 and dp 2 x tp 2
across two nodes give the tokens of one node through node 0's HTTP API; nothing listens beyond each node's own
address; node 1 serves only /health, which fails once node 0 is gone; a lost node (killed, or its link down) and a
node that never comes end the deployment with the node named, leaving no process behind."""

import contextlib
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.netns_utils import ADDRS, NamespaceClient, can_make_namespaces, enter_namespace, link_down, namespace_pair
from tests.server_utils import InFlight, ServerProcess, descendants, wait_gone
from tests.test_dp_server import PROMPTS
from tests.tiny_models import tiny_server_args

pytestmark = pytest.mark.skipif(can_make_namespaces() is not None, reason=str(can_make_namespaces()))
TIMEOUT = 8  # --dist-timeout: the start-up rendezvous, collectives and heartbeats
WATCHDOG_S = 3  # --watchdog-timeout where a test stops a rank


@pytest.fixture(scope="module")
def tiny_args(tmp_path_factory) -> tuple[str, ...]:
    return tiny_server_args("qwen3", tmp_path_factory.mktemp("tiny-qwen3"))


class TwoNodes:
    """Node 0 and node 1 of one deployment, each in its namespace, with HTTP clients inside them."""

    def __init__(self, namespaces: tuple[str, str], *args: str, start: tuple[int, ...] = (0, 1)):
        common = ("--nnodes", "2", "--dist-init-addr", f"{ADDRS[0]}:5000", "--dist-timeout", str(TIMEOUT), *args)
        self.nodes = [ServerProcess(*common, "--node-rank", str(i), netns=namespaces[i], host=ADDRS[i], port=30000,
                                    wait=False) for i in start]
        self.clients = [NamespaceClient(ns) for ns in namespaces]
        self.url = f"http://{ADDRS[0]}:30000"

    def wait_ready(self) -> None:
        for node in self.nodes:
            node._wait_ready(180)

    def complete_all(self, prompts: list, **kwargs) -> list[str]:
        def one(p):
            r = self.clients[0].request("POST", f"{self.url}/v1/completions", json={
                "model": "default", "prompt": p, "max_tokens": 12, "temperature": 0, **kwargs})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, prompts))

    def listeners(self, i: int) -> list[str]:
        """Local addresses of the TCP sockets listening in node i's namespace."""
        out = subprocess.run(["ip", "netns", "exec", self.nodes[i].proc.args[3], "ss", "-ltnH"], capture_output=True,
                             text=True, timeout=10).stdout
        return [line.split()[3] for line in out.splitlines()]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        for c in self.clients:
            c.close()


def _complete_all_one_node(server: ServerProcess, prompts: list) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda p: client.completions.create(model="default", prompt=p, max_tokens=12,
                                                                  temperature=0).choices[0].text, prompts))


def _kill_tree(server: ServerProcess) -> list[int]:
    """SIGKILLs a node's main process and its children; returns the pids that were killed."""
    pids = [server.proc.pid, *descendants(server.proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _ends_naming_node1(node0: ServerProcess, within: float) -> None:
    tree = [node0.proc.pid, *descendants(node0.proc.pid)]
    node0.proc.wait(within)
    assert node0.proc.returncode != 0
    out = node0.output()
    assert "node 1 at 192.0.2.2" in out, out[-3000:]
    assert wait_gone(tree, 10) == []


@pytest.fixture(scope="module")
def embedded_want(embedded_server) -> list[str]:
    """The embedded model's greedy completions of PROMPTS on one node."""
    return _complete_all_one_node(embedded_server, PROMPTS)


def test_pp2_across_two_nodes_then_node0_is_killed(embedded_want):
    want = embedded_want
    with namespace_pair() as ns:
        pair = TwoNodes(ns, "--pp", "2")
        try:
            pair.wait_ready()
            assert pair.complete_all(PROMPTS) == want
            assert "node 1 joined from 192.0.2.2: ranks dp0 pp1 tp0" in pair.nodes[0].output()
            health1 = f"http://{ADDRS[1]}:30000/health"
            assert pair.clients[1].status(health1) == 200
            assert pair.clients[1].status(f"http://{ADDRS[1]}:30000/v1/models") == 404  # no front end there
            for i in (0, 1):  # every listening socket is on the node's own address
                assert {addr.rsplit(":", 1)[0] for addr in pair.listeners(i)} == {ADDRS[i]}, pair.listeners(i)
            node1_tree = [pair.nodes[1].proc.pid, *descendants(pair.nodes[1].proc.pid)]
            killed, seen = time.monotonic(), set()
            _kill_tree(pair.nodes[0])
            while pair.nodes[1].proc.poll() is None and time.monotonic() < killed + TIMEOUT + 5:
                seen.add(pair.clients[1].status(health1))  # 0: nothing answers any more
                time.sleep(0.05)
            assert 503 in seen  # unhealthy while it goes down, before it exits
            pair.nodes[1].proc.wait(1)
            assert pair.nodes[1].proc.returncode != 0
            assert wait_gone(node1_tree, 10) == []
        finally:
            pair.stop()


def test_dp2_across_two_nodes_then_node1_is_killed(embedded_want):
    want = embedded_want
    with namespace_pair() as ns:
        pair = TwoNodes(ns, "--dp", "2", "--load-balance-method", "round_robin")
        try:
            pair.wait_ready()
            assert pair.complete_all(PROMPTS) == want
            states = pair.clients[0].request("GET", f"{pair.url}/server_info").json()["internal_states"]
            assert [s["num_received"] for s in states] == [4, 4]  # replica 1 lives on node 1
            start = time.monotonic()
            _kill_tree(pair.nodes[1])
            _ends_naming_node1(pair.nodes[0], TIMEOUT + 5)
            assert time.monotonic() - start < TIMEOUT + 5
        finally:
            pair.stop()


def test_tp2_and_dp2_tp2_across_two_nodes_then_a_link_goes_down(tiny_args):
    one = ServerProcess(*tiny_args)
    try:
        want = _complete_all_one_node(one, PROMPTS)
    finally:
        one.stop()
    with namespace_pair() as ns:
        pair = TwoNodes(ns, *tiny_args, "--dp", "2", "--tp", "2", "--load-balance-method", "round_robin")
        try:
            pair.wait_ready()
            assert pair.complete_all(PROMPTS) == want
        finally:
            pair.stop()
        pair = TwoNodes(ns, *tiny_args, "--tp", "2")  # one TP group across the two nodes
        try:
            pair.wait_ready()
            assert pair.complete_all(PROMPTS) == want
            start = time.monotonic()
            node1_tree = [pair.nodes[1].proc.pid, *descendants(pair.nodes[1].proc.pid)]
            link_down(ns[1])
            _ends_naming_node1(pair.nodes[0], TIMEOUT + 8)
            assert time.monotonic() - start < TIMEOUT + 8
            pair.nodes[1].proc.wait(TIMEOUT + 8)  # node 1, cut off from node 0, ends too
            assert pair.nodes[1].proc.returncode != 0 and "node 0 at 192.0.2.1:5000" in pair.nodes[1].output()
            assert wait_gone(node1_tree, 10) == []
        finally:
            pair.stop()


def test_node0_alone_fails_naming_the_missing_node(tiny_args):
    with namespace_pair() as ns:
        pair = TwoNodes(ns, *tiny_args, "--pp", "2", start=(0,))
        try:
            start = time.monotonic()
            _ends_naming_node1_never_joined(pair.nodes[0], TIMEOUT + 15)
            assert time.monotonic() - start < TIMEOUT + 15
        finally:
            pair.stop()


def _ends_naming_node1_never_joined(node0: ServerProcess, within: float) -> None:
    node0.proc.wait(within)
    assert node0.proc.returncode != 0
    out = node0.output()
    assert "node 1 (ranks dp0 pp1 tp0) did not join within 8 s" in out, out[-3000:]


def test_a_stopped_rank_on_node1_ends_both_nodes(tiny_args):
    """SIGSTOP of node 1's rank of a pipeline across the nodes: node 1's watchdog names it and tells node 0, whose
    own stalled rank (waiting on it) is named after it; /health on node 0 turns 503, the request in flight ends
    with that error, both nodes exit non-zero and no process is left on either."""
    with namespace_pair() as ns:
        pair = TwoNodes(ns, *tiny_args, "--pp", "2", "--watchdog-timeout", str(WATCHDOG_S), "--context-length", "4096")
        try:
            pair.wait_ready()
            trees = [[n.proc.pid, *descendants(n.proc.pid)] for n in pair.nodes]
            # long enough to be running when the rank stops, however slow the machine
            request = InFlight(pair.url, PROMPTS[0], 4000, setup=lambda: enter_namespace(ns[0]))
            request.wait_streaming(60)
            os.kill(pair.nodes[1].child_pid("gridserve::scheduler dp0 pp1 tp0"), signal.SIGSTOP)
            start, body = time.monotonic(), ""
            while pair.nodes[0].proc.poll() is None and time.monotonic() - start < WATCHDOG_S + 15:
                r = pair.clients[0].request("GET", f"{pair.url}/health", timeout=3)
                if r.status_code == 503:
                    body = r.json()["error"]["message"]
                    break
                time.sleep(0.1)
            unhealthy = time.monotonic() - start
            cause = ("node 1 at 192.0.2.2 (ranks dp0 pp1 tp0) failed: scheduler dp0 pp1 tp0 made no progress for "
                     f"over {WATCHDOG_S} s (--watchdog-timeout): stopped (SIGSTOP, or a debugger)")
            assert body.startswith(f"the server is shutting down: {cause}"), body
            assert request.join(15) and cause in request.outcome(), request.outcome()
            for node in pair.nodes:
                node.proc.wait(15)
                assert node.proc.returncode == 1, node.output()[-3000:]
            assert "scheduler dp0 pp1 tp0 made no progress" in pair.nodes[1].output()
            assert wait_gone(trees[0] + trees[1], 10) == []
            print(f"\n[fault matrix] two nodes, pp 2, SIGSTOP of node 1's rank: node 0 503 after {unhealthy:.1f} s, "
                  f"both nodes gone in {time.monotonic() - start:.1f} s")
        finally:
            for pid in descendants(pair.nodes[1].proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            pair.stop()
