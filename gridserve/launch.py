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
from collections.abc import Callable
from multiprocessing.connection import wait

import zmq

from gridserve.ipc import PortArgs, zmq_socket
from gridserve.launch_plan import LaunchPlan
from gridserve.managers.tokenizer_manager import TokenizerManager
from gridserve.model_loader.paths import resolve_model_path
from gridserve.process_utils import describe_exit, spawn_without_main, terminate_processes
from gridserve.server_args import ServerArgs

logger = logging.getLogger(__name__)
# scheduler_info keys that every rank must agree on
_SHARED_LIMITS = ("max_total_num_tokens", "max_running_requests", "context_len", "max_req_input_len")


class ChildFailedError(RuntimeError):
    pass


# The children's entry points import the model stack (torch, triton, the models) themselves, so this module
# stays light and the launcher spawns them before it imports anything heavy: the children's imports, the
# front end's and the tokenizer load then overlap instead of queueing (start-up time, docs/benchmarks.md).
def _scheduler_main(*args) -> None:
    from gridserve.scheduler.run import run_scheduler_process

    run_scheduler_process(*args)


def _detokenizer_main(*args) -> None:
    from gridserve.managers.detokenizer import run_detokenizer_process

    run_detokenizer_process(*args)


def _dp_controller_main(*args) -> None:
    from gridserve.managers.data_parallel_controller import run_data_parallel_controller_process

    run_data_parallel_controller_process(*args)


class Deployment:
    """The running processes of this node and the TokenizerManager that talks to them."""

    def __init__(self, args: ServerArgs, on_child_death: Callable[[str], None] | None = None):
        self.args = args
        self.on_child_death = on_child_death
        self.plan = LaunchPlan.for_node(args)
        self.port_args = PortArgs.create(args.dp_size, args.dist_init_addr)
        self.procs: list[tuple[str, mp.Process]] = []
        self.stopping = threading.Event()
        self.tm: TokenizerManager | None = None
        self.scheduler_info: dict = {}
        self._zmq = zmq.Context()
        self._threads: list[threading.Thread] = []
        atexit.register(self.shutdown)  # an Engine the caller never shut down still ends quietly
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up -------------------------------------------------------------------------------
    def _start(self) -> None:
        args, plan, ports, ctx = self.args, self.plan, self.port_args, mp.get_context("spawn")
        if args.nnodes > 1:  # `gridserve serve --dry-run` prints multi-node plans already
            raise ValueError("--nnodes > 1 is not supported yet")
        logger.info("this node starts %s", plan.describe())
        model_path = resolve_model_path(args.model_path)
        readers = {f"scheduler {rank.name}": self._spawn(ctx, f"scheduler {rank.name}", _scheduler_main,
                                                         (args, ports, rank)) for rank in plan.ranks}
        if plan.detokenizer:
            readers["detokenizer"] = self._spawn(ctx, "detokenizer", _detokenizer_main, (args, ports, model_path))
        if plan.dp_controller:
            readers["dp_controller"] = self._spawn(ctx, "dp_controller", _dp_controller_main, (args, ports))
        # while the children load the model
        from gridserve.model_loader.loader import load_model_config
        from gridserve.tokenizer import get_tokenizer

        cfg = load_model_config(model_path)  # a bad split fails here, before the children have imported torch
        cfg.check_parallel(args.tp_size, args.pp_size, args.pp_partition)
        tokenizer = get_tokenizer(model_path, args.tokenizer_path)
        infos = self._wait_ready(readers)
        scheduler_infos = [infos[f"scheduler {rank.name}"] for rank in plan.ranks]
        self._check_same_limits(scheduler_infos)
        self.scheduler_info = scheduler_infos[0]
        push = zmq_socket(self._zmq, zmq.PUSH, ports.request_input)
        self.tm = TokenizerManager(tokenizer, self.scheduler_info, cfg.vocab_size, push.send_pyobj,
                                   args.model_name, args.random_seed, args.dp_size)
        self._pull = zmq_socket(self._zmq, zmq.PULL, ports.tokenizer_input)
        self._threads = [threading.Thread(target=self._receive_loop, name="gridserve-tm-recv", daemon=True),
                         threading.Thread(target=self._watchdog, name="gridserve-watchdog", daemon=True)]
        for t in self._threads:
            t.start()

    def _spawn(self, ctx, name: str, target, args: tuple):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(*args, writer), name=name, daemon=True)
        with spawn_without_main():
            proc.start()
        writer.close()  # the child holds the only write end: its death shows as EOF on the reader
        self.procs.append((name, proc))
        return reader

    def _wait_ready(self, readers: dict[str, object]) -> dict[str, dict]:
        """Waits for every child's report (by role name), checking every second that none has died."""
        procs = dict(self.procs)
        infos: dict[str, dict] = {}
        pending = dict(readers)
        while pending:
            for reader in wait(list(pending.values()), timeout=1.0):
                name = next(k for k, r in pending.items() if r is reader)
                proc = procs[name]
                try:
                    info = reader.recv()
                except EOFError:
                    proc.join(5)
                    raise ChildFailedError(f"{name} (pid {proc.pid}) {describe_exit(proc.exitcode)} "
                                           "before it was ready") from None
                if info.get("status") == "error":
                    raise ChildFailedError(f"{name} failed to start:\n{info['message']}")
                infos[name] = info
                del pending[name]
            for name in list(pending):
                proc = procs[name]
                if not proc.is_alive():
                    raise ChildFailedError(f"{name} (pid {proc.pid}) {describe_exit(proc.exitcode)} "
                                           "before it was ready")
        return infos

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
                    self.tm.handle_output(self._pull.recv_pyobj())
            except zmq.ZMQError:
                return  # the context is being closed

    def _watchdog(self) -> None:
        sentinels = {proc.sentinel: (name, proc) for name, proc in self.procs}
        while not self.stopping.is_set():
            ready = wait(list(sentinels), timeout=0.5)
            if not ready or self.stopping.is_set():
                continue
            name, proc = sentinels[ready[0]]
            proc.join(1)
            reason = f"{name} (pid {proc.pid}) {describe_exit(proc.exitcode)}"
            logger.error("%s; shutting the deployment down", reason)
            self.tm.fail_all(reason)
            terminate_processes([p for _, p in self.procs])
            if self.on_child_death is not None:
                self.on_child_death(reason)
            return

    def shutdown(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        atexit.unregister(self.shutdown)
        terminate_processes([p for _, p in self.procs])
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(2)
        self._zmq.destroy(linger=0)
        self.port_args.cleanup()


def launch_subprocesses(args: ServerArgs, on_child_death: Callable[[str], None] | None = None) -> Deployment:
    logger.info("starting gridserve (pid %d): model %s", os.getpid(), args.model_path or "embedded SmolLM2-135M")
    return Deployment(args, on_child_death)
