"""`gridserve bench ...`: the benchmark commands (offline, latency; serving later)."""

import argparse
import sys


def _offline(args: argparse.Namespace) -> int:
    from gridserve.bench.offline import run, validate_workload_args
    from gridserve.server_args import ServerArgs

    try:  # bad flags: a one-line message before anything loads, not a traceback
        validate_workload_args(args)
        ServerArgs.from_cli_args(args)
    except ValueError as e:
        print(f"gridserve bench offline: error: {e}", file=sys.stderr)
        return 2
    return run(args)


def _latency(args: argparse.Namespace) -> int:
    from gridserve.bench.latency import run, validate_latency_args
    from gridserve.server_args import ServerArgs

    try:
        validate_latency_args(args)
        ServerArgs.from_cli_args(args)
    except ValueError as e:
        print(f"gridserve bench latency: error: {e}", file=sys.stderr)
        return 2
    return run(args)


def add_bench_parser(subparsers) -> None:
    """Registers `bench` and its sub-commands on the top-level `gridserve` sub-parsers."""
    from gridserve.bench.offline import add_offline_args

    bench = subparsers.add_parser("bench", help="benchmarks")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    offline = commands.add_parser("offline", help="throughput of the in-process Engine on a random workload",
                                  description="Throughput of the in-process Engine on nano-vllm's random workload.")
    add_offline_args(offline)
    offline.set_defaults(func=_offline)
    from gridserve.bench.latency import add_latency_args

    latency = commands.add_parser("latency", help="batch-1 TTFT and TPOT through the real pipeline")
    add_latency_args(latency)
    latency.set_defaults(func=_latency)
