"""Entry point of a deployment: `gridserve serve ...` or `python -m gridserve.launch_server --model-path ...`.

launch_server serves HTTP (FastAPI on uvicorn); serve_grpc serves gRPC (--grpc-mode). Both start the
processes with launch_subprocesses, and both end the deployment with a non-zero exit code when a child
process dies, after a short grace period in which /health (or the Health RPC) reports the failure.
"""

import argparse
import asyncio
import contextlib
import importlib
import logging
import signal
import sys
import threading
import time

from gridserve import preflight
from gridserve.launch import ChildFailedError, launch_subprocesses
from gridserve.process_utils import freeze_startup_objects, in_main_thread
from gridserve.server_args import ServerArgs

logger = logging.getLogger("gridserve")
DEATH_GRACE_S = 2.0  # keep answering (with errors) this long after a child died, so clients learn why


def _announce_ready(started: float, is_ready) -> None:
    def watch():
        while not is_ready():
            time.sleep(0.05)
        logger.info("server ready in %.1f s", time.perf_counter() - started)

    threading.Thread(target=watch, daemon=True).start()


def _exit_code(failed: list[str]) -> int:
    if failed:
        logger.error("deployment stopped: %s", failed[0])
        return 1
    return 0


def launch_server(args: ServerArgs) -> int:
    started = time.perf_counter()
    failed: list[str] = []
    server = None

    def on_child_death(reason: str) -> None:
        failed.append(reason)
        threading.Timer(DEATH_GRACE_S, lambda: server and setattr(server, "should_exit", True)).start()

    # The HTTP stack's imports (~1 s) run while the children start, not before them.
    importer = threading.Thread(target=importlib.import_module, args=("gridserve.entrypoints.http_server",),
                                daemon=True)
    importer.start()
    deployment = launch_subprocesses(args, on_child_death)
    importer.join()
    import uvicorn

    from gridserve.entrypoints.http_server import create_app

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:  # SIGTERM / SIGINT: open streams end with an error event
            deployment.tm.fail_all(f"stopped by {signal.Signals(sig).name}")
            super().handle_exit(sig, frame)

    try:
        app = create_app(deployment.tm, args, args.api_key)
        server = Server(uvicorn.Config(app, host=args.host, port=args.port, loop="uvloop",
                                       log_level=(args.log_level_http or args.log_level).lower(),
                                       timeout_graceful_shutdown=3))
        _announce_ready(started, lambda: server.started)
        freeze_startup_objects()
        with _signals_survived():
            server.run()
    finally:
        deployment.shutdown()
    return _exit_code(failed)


@contextlib.contextmanager
def _signals_survived():
    """uvicorn handles SIGTERM/SIGINT, then raises the signal again once it has stopped, to end the process with
    it; with these no-op handlers in place that second signal lands here instead, and the caller's clean-up
    (children stopped, IPC directory removed) still runs, ending with status 0."""
    saved = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def serve_grpc(args: ServerArgs) -> int:
    from gridserve.entrypoints.grpc.grpc_server import serve_grpc_forever

    started = time.perf_counter()
    failed: list[str] = []
    deployment = launch_subprocesses(args, lambda reason: failed.append(reason))

    freeze_startup_objects()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(serve_grpc_forever(deployment.tm, args, args.host, args.port))

        def stop(sig: signal.Signals) -> None:  # streams end with an error, then the server stops
            deployment.tm.fail_all(f"stopped by {sig.name}")
            loop.call_later(0.2, task.cancel)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig)
        logger.info("gRPC server ready in %.1f s", time.perf_counter() - started)
        while not task.done():
            await asyncio.sleep(0.2)
            if failed:
                await asyncio.sleep(DEATH_GRACE_S)
                task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(run())
    finally:
        deployment.shutdown()
    return _exit_code(failed)


def serve_node(args: ServerArgs) -> int:
    """A node other than node 0: its ranks only and a /health on --host:--port, until node 0 stops the
    deployment (exit 0) or something fails (non-zero, with the reason logged)."""
    from gridserve.entrypoints.node_health import start_health_server

    started = time.perf_counter()
    done, failed = threading.Event(), []
    deployment = launch_subprocesses(args, lambda reason: (failed.append(reason), done.set()))
    health = start_health_server(args.host, args.port, deployment.healthy)
    def on_signal(signum, _frame) -> None:  # node 0 cannot go on without this node: tell it at once
        if deployment.agent is not None:
            deployment.agent.failed(f"node {args.node_rank} was stopped by {signal.Signals(signum).name}")
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    freeze_startup_objects()
    logger.info("node %d ready in %.1f s: /health on %s:%d", args.node_rank, time.perf_counter() - started,
                args.host, args.port)
    try:
        while not done.wait(0.5):
            pass
    finally:
        health.shutdown()
        deployment.shutdown()
    agent = deployment.agent
    if agent is not None and agent.stopped and not agent.stop_reason:  # node 0 ended the deployment on purpose
        return 0
    return _exit_code(failed)


def run(args: ServerArgs) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    if not in_main_thread():
        raise RuntimeError("launch_server must run in the main thread (it owns the signal handlers)")
    try:
        preflight.check_port(args.host, args.port)  # before anything starts (a node > 0 serves /health there)
        if args.node_rank > 0:
            return serve_node(args)
        return serve_grpc(args) if args.grpc_mode else launch_server(args)
    except (ChildFailedError, ValueError) as e:  # ValueError: a model that cannot be split as asked
        logger.error("start-up failed: %s", e)
        return 1


def main(argv: list[str] | None = None) -> int:
    from gridserve.cli import add_dry_run_flag
    from gridserve.launch_plan import dry_run_report

    parser = argparse.ArgumentParser(prog="python -m gridserve.launch_server")
    ServerArgs.add_cli_args(parser)
    add_dry_run_flag(parser)
    ns = parser.parse_args(argv)
    try:
        args = ServerArgs.from_cli_args(ns)
        if ns.dry_run:
            print(dry_run_report(args))
            return 0
    except ValueError as e:
        parser.error(str(e))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
