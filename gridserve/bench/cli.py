"""`gridserve bench ...`: the benchmark commands (offline, latency; serving later)."""

import argparse
import sys


def _checked(name: str, validate, run):
    """A bench command that rejects bad flags with a one-line message before anything loads."""

    def command(args: argparse.Namespace) -> int:
        from gridserve.server_args import ServerArgs

        try:
            validate(args)
            ServerArgs.from_cli_args(args)
        except ValueError as e:
            print(f"gridserve bench {name}: error: {e}", file=sys.stderr)
            return 2
        return run(args)

    return command


def add_bench_parser(subparsers) -> None:
    """Registers `bench` and its sub-commands on the top-level `gridserve` sub-parsers."""
    from gridserve.bench import latency, offline

    bench = subparsers.add_parser("bench", help="benchmarks")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    p = commands.add_parser("offline", help="throughput of the Engine on a random workload",
                            description="Throughput of the Engine on nano-vllm's random workload.")
    offline.add_offline_args(p)
    p.set_defaults(func=_checked("offline", offline.validate_workload_args, offline.run))
    p = commands.add_parser("latency", help="batch-1 TTFT and TPOT through the real pipeline")
    latency.add_latency_args(p)
    p.set_defaults(func=_checked("latency", latency.validate_latency_args, latency.run))
