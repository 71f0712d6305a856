"""run_scheduler_process: the body of one scheduler (rank) process."""

import importlib
import logging
import os
import sys
import threading
import time
import traceback

import torch
import zmq
from tqdm import tqdm

from gridserve.distributed.parallel_state import get_tp_group, init_model_parallel
from gridserve.distributed.ranks import RankInfo
from gridserve.ipc import Channel, PortArgs, interface_of
from gridserve.model_executor.model_runner import resolve_device
from gridserve.model_loader.loader import load_model_config, resolve_model_path
from gridserve.process_utils import PEER_GONE_EXIT, freeze_startup_objects, init_child_process, parent_alive
from gridserve.scheduler.scheduler import Scheduler
from gridserve.server_args import ServerArgs
from gridserve.tokenizer import get_decoder

logger = logging.getLogger(__name__)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


# what a GPU rank imports only once it builds its runner: the Triton kernels (triton's own import included)
_GPU_MODULES = ("triton", "gridserve.attention.triton_backend", "gridserve.attention.triton_ops",
                "gridserve.attention.triton_ops.merge_states", "gridserve.layers.fused_ops",
                "gridserve.layers.decode_gemm", "gridserve.layers.fused_moe", "gridserve.sampling.race_kernel")


def prepare_during_checks(args: ServerArgs, rank: RankInfo) -> float:
    """The start's work that commits to nothing, done while the launcher runs its start-up checks (seconds: torch's
    import there): on a GPU, the Triton kernels' modules and this rank's CUDA context. Any error is left to the start
    proper, after the checks, to report. Returns time.monotonic() at its end."""
    try:
        device = resolve_device(args.device, rank.gpu_id)
        if device.type == "cuda":
            for name in _GPU_MODULES:
                importlib.import_module(name)
            if rank.gpu_id < torch.cuda.device_count():
                torch.zeros(1, device=device)  # creates the context
    except Exception:  # noqa: BLE001, S110 - the checks, or the start after them, say what is wrong
        pass
    return time.monotonic()


def run_scheduler_process(args: ServerArgs, port_args: PortArgs, rank: RankInfo, progress, pipe_writer,
                          waited_s: float | None = None) -> None:
    """progress: a shared counter (multiprocessing.Value) that the event loop advances for the watchdog; waited_s:
    how long the rank, prepared (prepare_during_checks), waited for the launcher's checks."""
    parent = init_child_process(f"scheduler {rank.name}", args.log_level)
    # tqdm's default lock is a multiprocessing one, which a terminated rank never unregisters: the resource tracker
    # then warns of "leaked semaphore objects" at every shutdown. One process needs only a thread lock.
    tqdm.set_lock(threading.RLock())
    # its timestamp shows the import cost at start-up; the wait, whether the launcher's checks took longer
    logger.info("scheduler process up (imports done%s)",
                "" if waited_s is None else f"; waited {waited_s:.1f} s for the start-up checks")
    try:
        path = resolve_model_path(args.model_path)
        # the launcher has checked that it splits into this tp x pp grid
        cfg = load_model_config(path).with_moe_routing(args.moe_routing)
        device = resolve_device(args.device, rank.gpu_id)
        if device.type == "cpu":
            torch.set_num_threads(args.threads_per_rank(rank.layout.ranks_per_node))
            logger.info("%d torch threads (--cpu-threads, else $OMP_NUM_THREADS, else cores / ranks on this node)",
                        torch.get_num_threads())
        _choose_interface(args.dist_ifname, port_args.node_addr)
        init_model_parallel(rank, port_args.dist_store, device, args.effective_dist_timeout, args.pp_partition,
                            args.ep_size)
        recv, send, report = _scheduler_io(port_args, rank, parent)
        tokenizer = get_decoder(path, args.tokenizer_path)  # to find stop strings in the output
        scheduler = Scheduler(args, path, cfg, tokenizer, recv, send, gpu_id=rank.gpu_id, dp_rank=rank.dp_rank,
                              report_load=report)
    except ValueError as e:  # a configuration the user can fix: the message says how
        pipe_writer.send({"status": "error", "message": str(e)})
        sys.exit(1)
    except Exception:
        pipe_writer.send({"status": "error", "message": traceback.format_exc()})
        sys.exit(1)
    scheduler.progress = progress
    freeze_startup_objects()
    pipe_writer.send(scheduler.scheduler_info)
    pipe_writer.close()
    try:
        with torch.inference_mode():
            scheduler.event_loop()
    except Exception as e:  # noqa: BLE001 - logged here, with this process's title, instead of a bare traceback
        gone = _peer_gone(e)
        if gone:  # the launcher names the rank that died; a traceback here would point at the wrong one
            logger.error("a peer rank is gone (%s); exiting", gone)
            sys.exit(PEER_GONE_EXIT)
        logger.exception("the event loop failed")
        sys.exit(1)


def _peer_gone(e: Exception) -> str | None:
    """The short form of a collective's error when its peer went away (gloo's transport errors), else None."""
    first = (str(e).splitlines() or [""])[0]
    if not any(s in first for s in _PEER_GONE):
        return None
    return first.split("] ", 1)[-1].split(". This is", 1)[0]  # without gloo's source location and advice


def _scheduler_io(port_args: PortArgs, rank: RankInfo, parent: int):
    """(recv, send, report_load). The IO rank (tp 0 of stage 0) reads its replica's requests from ZMQ and
    broadcasts them, possibly none, to the other TP ranks every iteration, so every rank forms the same batches;
    only it sends outputs on, and with dp > 1 it reports its replica's load to the DP controller."""
    tp = get_tp_group()
    if not rank.is_io_rank:
        return (lambda timeout_ms: tp.broadcast_object()), (lambda msg: None), None
    ctx, typed = zmq.Context(), port_args.typed
    replica = port_args.replicas[rank.dp_rank]
    requests = Channel(ctx, zmq.PULL, replica.scheduler_input, typed, bind=replica.io_rank_binds)
    detokenizer, controller = port_args.outputs_for(rank.node_rank)
    outputs = Channel(ctx, zmq.PUSH, detokenizer, typed)
    report = Channel(ctx, zmq.PUSH, controller, typed).send if rank.layout.dp > 1 else None

    def recv(timeout_ms: int) -> list:
        if not parent_alive(parent):
            logger.error("parent process is gone; exiting")
            sys.exit(1)
        return tp.broadcast_object(requests.recv_all(timeout_ms))

    return recv, outputs.send, report


def _choose_interface(override: str | None, node_addr: str) -> None:
    """gloo and NCCL open their sockets on the interface of this node's own address (lo on one node), so
    nothing of the deployment listens on other interfaces."""
    name = override or interface_of(node_addr)
    if name:
        os.environ["GLOO_SOCKET_IFNAME"] = name
        os.environ["NCCL_SOCKET_IFNAME"] = name
