"""`gridserve bench ...`: the benchmark commands (offline, latency, serving)."""

import argparse
import sys


def _checked(name: str, validate, run, server_args: bool = True):
    """A bench command that rejects bad flags with a one-line message before anything loads. `server_args=False`
    for pure clients (serving), which take no server flags."""

    def command(args: argparse.Namespace) -> int:
        from gridserve.server_args import ServerArgs

        try:
            validate(args)
            if server_args:
                ServerArgs.from_cli_args(args)
        except ValueError as e:
            print(f"gridserve bench {name}: error: {e}", file=sys.stderr)
            return 2
        return run(args)

    return command


def bench_main(argv: list[str]) -> int:
    """`gridserve bench ARGV...`. Its parser is built only when a benchmark runs: the benchmarks import torch,
    which `gridserve serve --dry-run` must not."""
    from gridserve.bench import latency, offline, serving

    bench = argparse.ArgumentParser(prog="gridserve bench", description="benchmarks")
    commands = bench.add_subparsers(dest="bench_command", required=True)
    p = commands.add_parser("offline", help="throughput of the Engine on a random workload",
                            description="Throughput of the Engine on nano-vllm's random workload.")
    offline.add_offline_args(p)
    p.set_defaults(func=_checked("offline", offline.validate_workload_args, offline.run))
    p = commands.add_parser("latency", help="batch-1 TTFT and TPOT through the real pipeline")
    latency.add_latency_args(p)
    p.set_defaults(func=_checked("latency", latency.validate_latency_args, latency.run))
    p = commands.add_parser("serving", help="load test of a running OpenAI-compatible server (gridserve, SGLang, vLLM)",
                            description="Online serving benchmark, like SGLang's bench_serving.")
    serving.add_serving_args(p)
    p.set_defaults(func=_checked("serving", serving.validate_serving_args, serving.run, server_args=False))
    args = bench.parse_args(argv)
    return args.func(args)
