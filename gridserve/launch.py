"""launch_subprocesses: start every child process of a deployment and wire them together.

The launch plan says what this node runs. Node 0 runs, in order: one scheduler per local rank (each reports its
scheduler_info through a one-way pipe once its model and KV cache are ready), the detokenizer, the DP controller
when dp > 1, and in this process the TokenizerManager with a ZMQ receiver thread and a watchdog that notices any
child's death within a second.
"""

import atexit
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait

import zmq

from gridserve import preflight
from gridserve.ipc import Channel, PortArgs, local_address_towards
from gridserve.launch_plan import LaunchPlan
from gridserve.managers.node_link import HEARTBEAT_S, NodeAgent, NodeHub
from gridserve.managers.tokenizer_manager import TokenizerManager
from gridserve.process_utils import (
    PEER_GONE_EXIT,
    describe_exit,
    process_state,
    spawn_without_main,
    terminate_processes,
)
from gridserve.server_args import ServerArgs

logger = logging.getLogger(__name__)
# scheduler_info keys that every rank must agree on
_SHARED_LIMITS = ("max_total_num_tokens", "max_running_requests", "context_len", "max_req_input_len")


class ChildFailedError(RuntimeError):
    pass


# The children's entry points import the model stack (torch, triton, the models) themselves, so this module
# stays light. The launcher spawns them first and runs its start-up checks (which import the models too) and
# the tokenizer load while they import: the imports overlap instead of queueing (start-up time,
# docs/benchmarks.md). A child waits for `go` before it does anything that could fail loudly, so a failed check
# stops children that have printed nothing.
def _after_checks(go) -> None:
    parent = mp.parent_process()
    while not go.wait(1.0):
        if parent is not None and not parent.is_alive():  # the launcher died during its checks
            os._exit(1)


def _scheduler_main(go, *args) -> None:
    from gridserve.scheduler.run import prepare_during_checks, run_scheduler_process

    prepared_at = prepare_during_checks(args[0], args[2])
    _after_checks(go)
    run_scheduler_process(*args, waited_s=time.monotonic() - prepared_at)


def _detokenizer_main(go, *args) -> None:
    from gridserve.managers.detokenizer import run_detokenizer_process

    _after_checks(go)
    run_detokenizer_process(*args)


def _dp_controller_main(go, *args) -> None:
    from gridserve.managers.data_parallel_controller import run_data_parallel_controller_process

    _after_checks(go)
    run_data_parallel_controller_process(*args)


class Deployment:
    """The running processes of this node, the TokenizerManager that talks to them (node 0), and the node link
    to the other nodes (several nodes)."""

    def __init__(self, args: ServerArgs, on_child_death: Callable[[str], None] | None = None):
        self.args = args
        self.on_child_death = on_child_death
        self.plan = LaunchPlan.for_node(args)
        self.node_addr = node_address(args)
        self.port_args = PortArgs.create(args.dp_size, args.dist_init_addr, args.nnodes,
                                         self.plan.layout.io_rank_nodes(), self.node_addr)
        self.procs: list[tuple[str, mp.Process]] = []
        self.stopping = threading.Event()
        self.tm: TokenizerManager | None = None
        self.hub: NodeHub | None = None  # node 0 of several
        self.agent: NodeAgent | None = None  # every other node
        self.scheduler_info: dict = {}
        self.failure: str | None = None  # why the deployment ended, when it did not end on purpose
        self._zmq = zmq.Context()
        self._threads: list[threading.Thread] = []
        atexit.register(self.shutdown)  # an Engine the caller never shut down still ends quietly
        try:
            self._start()
        except BaseException as e:
            self.failure = str(e) or type(e).__name__
            if self.agent is not None:  # node 0 learns the real error instead of waiting out the timeout
                self.agent.failed(f"start-up failed: {self.failure}")
            self.shutdown()
            raise

    # ---- start-up -------------------------------------------------------------------------------
    def _start(self) -> None:
        args, plan, ports, ctx = self.args, self.plan, self.port_args, mp.get_context("spawn")
        self._started = time.monotonic()
        logger.info("node %d (%s) starts %s; IPC directory %s", args.node_rank, self.node_addr, plan.describe(),
                    ports.ipc_dir)
        model_path = preflight.resolve_model(args)
        go = ctx.Event()
        # one shared counter per rank, advanced by its event loop: the watchdog's view of its progress
        self.progress = {f"scheduler {rank.name}": ctx.Value("Q", 0, lock=False) for rank in plan.ranks}
        readers = {name: self._spawn(ctx, name, _scheduler_main, (go, args, ports, rank, self.progress[name]))
                   for rank, name in zip(plan.ranks, self.progress, strict=True)}
        if plan.detokenizer:
            readers["detokenizer"] = self._spawn(ctx, "detokenizer", _detokenizer_main, (go, args, ports, model_path))
        if plan.dp_controller:
            readers["dp_controller"] = self._spawn(ctx, "dp_controller", _dp_controller_main, (go, args, ports))
        # while the children import: a user's mistake must cost a second, not a model load
        _, cfg = preflight.check_model(args, model_path)
        preflight.check_device(args, plan.layout.ranks_per_node)
        self._open_node_link()
        go.set()
        logger.info("start-up checks passed after %.1f s; %d processes go on", time.monotonic() - self._started,
                    len(readers))
        # the tokenizer too loads while the children import and load the model (transformers' import alone takes
        # seconds); one that does not load still fails the start at once: the children are stopped
        tokenizer = preflight.load_tokenizer(model_path, args.tokenizer_path) if plan.tokenizer_manager else None
        infos = self._wait_ready(readers)
        scheduler_infos = [infos[f"scheduler {rank.name}"] for rank in plan.ranks]
        if self.agent is not None:
            self.agent.ready([rank.name for rank in plan.ranks], scheduler_infos)
        if self.hub is not None:  # every rank of every node must agree
            scheduler_infos += [info for n in sorted(self.hub.ready) for info in self.hub.ready[n].infos]
        self._check_same_limits(scheduler_infos)
        self.scheduler_info = scheduler_infos[0]
        if plan.tokenizer_manager:
            push = Channel(self._zmq, zmq.PUSH, ports.request_input, ports.typed)
            self.tm = TokenizerManager(tokenizer, self.scheduler_info, cfg.vocab_size, push.send,
                                       args.model_name, args.random_seed, args.dp_size,
                                       args.abort_on_priority_when_disabled and not args.enable_priority_scheduling,
                                       send_now=push.try_send)
            self._pull = Channel(self._zmq, zmq.PULL, ports.tokenizer_input, ports.typed)
            self._threads.append(threading.Thread(target=self._receive_loop, name="gridserve-tm-recv", daemon=True))
        self._threads.append(threading.Thread(target=self._watchdog, name="gridserve-watchdog", daemon=True))
        for t in self._threads:
            t.start()

    def _open_node_link(self) -> None:
        args, timeout = self.args, self.args.effective_dist_timeout
        if args.nnodes == 1:
            return
        if args.node_rank == 0:
            expected = {n: [r.name for r in LaunchPlan.for_node(args, n).ranks] for n in range(1, args.nnodes)}
            self.hub = NodeHub(self.port_args.node_link, expected, timeout)
        else:
            self.agent = NodeAgent(self.port_args.node_link, args.node_rank, self.node_addr, timeout)

    def _spawn(self, ctx, name: str, target, args: tuple):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(*args, writer), name=name, daemon=True)
        with spawn_without_main():
            proc.start()
        writer.close()  # the child holds the only write end: its death shows as EOF on the reader
        self.procs.append((name, proc))
        return reader

    def _wait_ready(self, readers: dict[str, object]) -> dict[str, dict]:
        """Waits for every child's report (by role name) and, on node 0 of several, every node's; checks every
        second that no child has died and that the other nodes came (within --dist-timeout) and stay."""
        procs = dict(self.procs)
        infos: dict[str, dict] = {}
        pending = dict(readers)
        while pending or (self.hub is not None and self.hub.missing()):
            for reader in wait(list(pending.values()), timeout=1.0):
                name = next(k for k, r in pending.items() if r is reader)
                proc = procs[name]
                try:
                    info = reader.recv()
                except EOFError:
                    proc.join(5)
                    raise ChildFailedError(self._explain(f"{name} (pid {proc.pid}) {describe_exit(proc.exitcode)} "
                                                         "before it was ready")) from None
                if info.get("status") == "error":
                    raise ChildFailedError(self._explain(f"{name} failed to start:\n{info['message']}"))
                infos[name] = info
                del pending[name]
            for name in list(pending):
                proc = procs[name]
                if not proc.is_alive():
                    raise ChildFailedError(self._explain(f"{name} (pid {proc.pid}) {describe_exit(proc.exitcode)} "
                                                         "before it was ready"))
            self._check_nodes()
        return infos

    def _never_joined(self) -> str | None:
        """Node 0, once --dist-timeout has passed: the nodes never heard from, as a message."""
        timeout = self.args.effective_dist_timeout
        never = [n for n in self.hub.missing() if n not in self.hub.last_seen]
        if not never or time.monotonic() - self._started < timeout - 0.5:
            return None
        return (f"{', '.join(self.hub.describe(n) for n in never)} did not join within {timeout:g} s: start the "
                f"same command there with its --node-rank; it must reach {self.args.dist_init_addr}")

    def _check_nodes(self) -> None:
        """Raises when another node never came, was lost, or (on node k) node 0 never answered."""
        if self.hub is not None:
            reason = self.hub.lost or self._never_joined()
            if reason:
                raise ChildFailedError(reason)
        if self.agent is not None:
            reason = self._node0_failure()
            if reason:
                raise ChildFailedError(reason)

    def _node0_failure(self, timeout: float | None = None) -> str | None:
        agent, addr = self.agent, self.args.dist_init_addr
        timeout = self.args.effective_dist_timeout if timeout is None else timeout
        if agent.silence_s() <= timeout:
            return None
        if not agent.heard:
            return f"node 0 at {addr} did not answer within {timeout:g} s: is it running, and reachable from here?"
        return f"node 0 at {addr} lost: no heartbeat for {agent.silence_s():.0f} s"

    def _explain(self, local: str) -> str:
        """A local process failed: with several nodes a lost node is the likelier cause, so name it first (give
        the node link a moment to notice a node whose processes were killed)."""
        if self.agent is not None:  # node k: a rank that fails because node 0 went away
            gone = self._node0_failure(2.5 * HEARTBEAT_S)
            return f"{gone}; then {local}" if gone else local
        if self.hub is None:
            return local
        never = self._never_joined()  # a rank's rendezvous times out as the launcher's wait does
        if never:
            return f"{never}; then {local}"
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not (self.hub.lost or self.hub.stale()):
            time.sleep(0.1)
        if self.hub.lost:
            return f"{self.hub.lost}; then {local}"
        stale = self.hub.stale()
        if stale:
            return f"{', '.join(self.hub.describe(n) for n in stale)} stopped answering; then {local}"
        return local

    @staticmethod
    def _check_same_limits(infos: list[dict]) -> None:
        for key in _SHARED_LIMITS:
            values = {info[key] for info in infos}
            if len(values) > 1:
                raise ChildFailedError(f"ranks disagree on {key}: {sorted(values)}")

    # ---- running --------------------------------------------------------------------------------
    def _receive_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                if self._pull.poll(100):
                    self.tm.handle_output(self._pull.recv())
            except zmq.ZMQError:
                return  # the context is being closed

    def _watchdog(self) -> None:
        """Ends this node's deployment when a child dies, another node is lost, or node 0 says stop."""
        sentinels = {proc.sentinel: (name, proc) for name, proc in self.procs}
        stall = _StallClock(self.progress, self.args.watchdog_timeout,
                            {name: proc.pid for name, proc in self.procs if name in self.progress})
        while not self.stopping.is_set():
            ready = wait(list(sentinels), timeout=0.5)
            if self.stopping.is_set():
                return
            reason = self._local_failure([sentinels[s] for s in ready], stall)
            if reason is not None:
                if self.agent is not None:
                    self.agent.failed(reason)
            elif self.hub is not None and self.hub.lost:
                reason = self.hub.lost
            elif self.agent is not None and (self.agent.stopped or self._node0_failure()):
                reason = self._node0_failure() or (f"node 0 stopped the deployment: {self.agent.stop_reason}"
                                                   if self.agent.stop_reason else "node 0 stopped the deployment")
            else:
                continue
            clean = self.agent is not None and self.agent.stopped and not self.agent.stop_reason
            if not clean:
                self.failure = reason
            logger.log(logging.INFO if clean else logging.ERROR, "%s; shutting the deployment down", reason)
            if self.tm is not None:
                self.tm.fail_all(reason)
            if self.hub is not None:  # before this node's ranks go: the other nodes then stop on node 0's word, with
                self.hub.close(self.failure or "")  # its reason, not on their own ranks' failed collectives
            terminate_processes([p for _, p in self.procs])
            if self.on_child_death is not None:
                self.on_child_death(reason)
            return

    def _local_failure(self, dead: list[tuple[str, mp.Process]], stall: "_StallClock") -> str | None:
        """Why this node's own processes failed (a death, or a rank that hangs), naming the cause; None when they
        did not, or (node k) when node 0 said stop meanwhile: its ranks then died or stalled because node 0's did."""
        hung = stall.hung()
        if hung:
            # A stopped rank of this node is the cause itself. Otherwise its ranks may wait on another node's hung
            # rank, which that node reports: node 0 gives the report a moment to come (_explain), node k node 0's stop.
            if stall.stopped:
                return hung
            return None if self._stopped_by_node0(3.0, or_silent=True) else self._explain(hung)
        if not dead or self._stopped_by_node0():
            return None
        for _, proc in dead:
            proc.join(1)
        # A rank's peers fail in their next collective with it: when the watchdog wakes to several deaths, name the
        # cause (a process killed by a signal, else one that failed on its own), not a rank that only lost a peer.
        name, proc = min(dead, key=lambda d: _blame_order(d[1].exitcode))
        if proc.exitcode == PEER_GONE_EXIT and self._stopped_by_node0(3.0, or_silent=True):
            return None  # its peer was on node 0, whose stop says why
        return self._explain(f"{name} (pid {proc.pid}) {describe_exit(proc.exitcode)}")

    def _stopped_by_node0(self, grace_s: float = 1.0, or_silent: bool = False) -> bool:
        """A rank of node k that dies while node 0 shuts down is no failure: node 0's stop may trail by a moment.
        or_silent: stop waiting when node 0 falls silent too (then _explain names it)."""
        if self.agent is None:
            return False
        deadline = time.monotonic() + grace_s
        while not self.agent.stopped and time.monotonic() < deadline:
            if or_silent and self.agent.silence_s() > 2.5 * HEARTBEAT_S:
                break
            time.sleep(0.05)
        return self.agent.stopped

    def healthy(self) -> str | None:
        """None while every local process is alive and (node k) node 0 answers; else why not."""
        dead = [name for name, proc in self.procs if not proc.is_alive()]
        if dead:
            return f"{', '.join(dead)} not running"
        if self.agent is not None:
            if self.agent.silence_s() > 2.5 * HEARTBEAT_S:
                return f"no heartbeat from node 0 at {self.args.dist_init_addr} for {self.agent.silence_s():.0f} s"
            if self.agent.stopped:
                return "node 0 stopped the deployment"
        return None

    def shutdown(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        atexit.unregister(self.shutdown)
        if self.tm is not None:
            self.tm.close()
        if self.hub is not None:  # first: the other nodes then stop on purpose, not on their ranks' errors
            self.hub.close(self.failure or "")
        terminate_processes([p for _, p in self.procs])
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(2)
        if self.agent is not None:
            self.agent.close()
        self._zmq.destroy(linger=0)
        self.port_args.cleanup()


class _StallClock:
    """When each rank's progress counter last moved; a rank whose counter stands still longer than the timeout is
    hung (stuck in a kernel or a collective, or stopped with SIGSTOP)."""

    def __init__(self, counters: dict, timeout_s: float, pids: dict[str, int] | None = None):
        self.counters, self.timeout_s, self.pids = counters, timeout_s, pids or {}
        now = time.monotonic()
        self.seen = {name: (c.value, now) for name, c in counters.items()}
        self.stopped: list[str] = []  # of the ranks hung() last named, those the kernel shows stopped

    def hung(self) -> str | None:
        now, stalled = time.monotonic(), []
        for name, counter in self.counters.items():
            value, since = self.seen[name]
            if counter.value != value:
                self.seen[name] = (counter.value, now)
            elif now - since > self.timeout_s:
                stalled.append(name)
        if not stalled:
            return None
        what = f"made no progress for over {self.timeout_s:g} s (--watchdog-timeout)"
        # The peers of a stopped rank stall in their next collective with it, and are named too: the process state
        # tells which rank is the cause, so that the message names it first.
        self.stopped = stopped = [n for n in stalled if process_state(self.pids.get(n, 0)) in ("T", "t")]
        if not stopped:
            return f"{', '.join(stalled)} {what}: hung, or stopped"
        waiting = [n for n in stalled if n not in stopped]
        also = f"; also stalled, likely waiting on {'it' if len(stopped) == 1 else 'them'}: {', '.join(waiting)}"
        return f"{', '.join(stopped)} {what}: stopped (SIGSTOP, or a debugger){also if waiting else ''}"


def _blame_order(exitcode: int | None) -> int:
    """Which of several dead processes to name as the cause: lowest first."""
    if exitcode is None:
        return 3
    if exitcode < 0:  # killed by a signal (the OOM killer, an operator)
        return 0
    return 2 if exitcode == PEER_GONE_EXIT else 1


def node_address(args: ServerArgs) -> str:
    """This node's own address: --dist-init-addr's host on node 0 (127.0.0.1 on a single node), and on another
    node the address of its interface towards node 0."""
    if not args.dist_init_addr:
        return "127.0.0.1"
    host, port = args.dist_init_addr.rsplit(":", 1)
    return host if args.node_rank == 0 else local_address_towards(host, int(port))


def launch_subprocesses(args: ServerArgs, on_child_death: Callable[[str], None] | None = None) -> Deployment:
    logger.info("starting gridserve (pid %d): model %s", os.getpid(), args.model_path or "embedded SmolLM2-135M")
    return Deployment(args, on_child_death)
