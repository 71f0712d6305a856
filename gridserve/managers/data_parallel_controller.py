"""The DP controller process (dp > 1): the TokenizerManager sends it every request; it picks a replica with the
load balancer and forwards the request to that replica's IO rank. Replicas send their outputs straight to the
one detokenizer, and their load reports here.

Control messages go to every replica. An abort reaches the replica that holds the request (the others do not
know the id and ignore it); for a flush or an internal-state request the TokenizerManager gathers one answer
per replica.
"""

import logging
import sys
import traceback
from collections.abc import Callable

import zmq

from gridserve.managers.load_balancer import LoadBalancer
from gridserve.messages import SchedulerStats, TokenizedGenerateReq

logger = logging.getLogger(__name__)


class DataParallelController:
    def __init__(self, balancer: LoadBalancer, replicas: list[Callable[[object], None]]):
        self.balancer = balancer
        self.replicas = replicas  # replica r's send function

    def handle(self, msg: object) -> None:
        if isinstance(msg, TokenizedGenerateReq):
            self.route(msg)
        elif isinstance(msg, SchedulerStats):
            self.balancer.on_report(msg)
        else:  # AbortReq, FlushCacheReq, GetInternalStateReq
            for dp_rank in range(len(self.replicas)):
                self._send(dp_rank, msg)

    def _send(self, dp_rank: int, msg: object) -> None:
        try:
            self.replicas[dp_rank](msg)
        except zmq.Again:  # its node is gone; the node link will end the deployment and fail the request
            logger.error("replica %d is unreachable; %s dropped", dp_rank, type(msg).__name__)

    def route(self, req: TokenizedGenerateReq) -> None:
        if req.routed_dp_rank is None:
            dp_rank = self.balancer.choose(req.input_ids)
        else:  # the TokenizerManager checked that it is in range
            dp_rank = req.routed_dp_rank
            self.balancer.dispatch(dp_rank, req.input_ids)
        self._send(dp_rank, req)


def run_data_parallel_controller_process(args, port_args, pipe_writer) -> None:
    """The process body: requests and load reports in on one socket, requests out to the replicas."""
    from gridserve.ipc import Channel
    from gridserve.process_utils import freeze_startup_objects, init_child_process, parent_alive

    parent = init_child_process("dp_controller", args.log_level)
    try:
        ctx = zmq.Context()
        typed = port_args.typed
        pull = Channel(ctx, zmq.PULL, [port_args.controller_input, port_args.remote_controller_input], typed)
        # A replica on another node connects to the endpoint bound here (node 0 binds every tcp endpoint). Its
        # sends never block: while a lost node goes unnoticed, the other replicas keep being served.
        pushes = [Channel(ctx, zmq.PUSH, r.scheduler_input, typed, bind=r.remote, block=not r.remote)
                  for r in port_args.replicas]
        balancer = LoadBalancer(args.load_balance_method, args.dp_size, max_queued=args.max_queued_requests)
        controller = DataParallelController(balancer, [push.send for push in pushes])
    except Exception:
        pipe_writer.send({"status": "error", "message": traceback.format_exc()})
        sys.exit(1)
    logger.info("routing requests over %d replicas (%s)", args.dp_size, args.load_balance_method)
    pipe_writer.send({"status": "ready"})
    pipe_writer.close()
    freeze_startup_objects()
    while parent_alive(parent):
        for msg in pull.recv_all(100):
            controller.handle(msg)
