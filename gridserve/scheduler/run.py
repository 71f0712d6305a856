"""run_scheduler_process: the body of one scheduler (rank) process."""

import logging
import sys
import traceback

import torch
import zmq

from gridserve.distributed.ranks import RankInfo
from gridserve.ipc import PortArgs, recv_all, zmq_socket
from gridserve.model_loader.loader import load_model_config, resolve_model_path
from gridserve.process_utils import init_child_process, parent_alive
from gridserve.scheduler.scheduler import Scheduler
from gridserve.server_args import ServerArgs
from gridserve.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)
IDLE_POLL_MS = 50  # how long an idle scheduler waits for a request before checking on its parent again


def run_scheduler_process(args: ServerArgs, port_args: PortArgs, rank: RankInfo, pipe_writer) -> None:
    parent = init_child_process(f"scheduler {rank.name}", args.log_level)
    try:
        ctx = zmq.Context()
        recv_sock = zmq_socket(ctx, zmq.PULL, port_args.scheduler_input)
        send_sock = zmq_socket(ctx, zmq.PUSH, port_args.detokenizer_input)

        def recv(block: bool) -> list:
            if not parent_alive(parent):
                logger.error("parent process is gone; exiting")
                sys.exit(1)
            return recv_all(recv_sock, IDLE_POLL_MS if block else 0)

        path = resolve_model_path(args.model_path)
        cfg = load_model_config(path)
        tokenizer = get_tokenizer(path, args.tokenizer_path)  # to find stop strings in the output
        scheduler = Scheduler(args, path, cfg, tokenizer, recv, send_sock.send_pyobj, gpu_id=rank.gpu_id)
    except Exception:
        pipe_writer.send({"status": "error", "message": traceback.format_exc()})
        sys.exit(1)
    pipe_writer.send(scheduler.scheduler_info)
    pipe_writer.close()
    with torch.inference_mode():
        scheduler.event_loop_normal()
