"""The `gridserve` command: serve, generate, bench."""

import argparse
import difflib
import sys

import gridserve
from gridserve.server_args import ServerArgs


def _generate(args: argparse.Namespace) -> int:
    from gridserve.entrypoints.engine import Engine
    from gridserve.errors import InvalidParamError
    from gridserve.launch import ChildFailedError
    from gridserve.sampling.sampling_params import SamplingParams

    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "seed": args.seed, "stop": args.stop or None}
    try:  # bad values fail before any process starts
        server_args = ServerArgs.from_cli_args(args)
        SamplingParams.from_dict(params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        engine = Engine(**vars(server_args))
    except (ChildFailedError, ValueError) as e:  # ValueError: a model that cannot be split as asked
        print(f"error: start-up failed: {e}", file=sys.stderr)
        return 1
    try:
        prompt = args.prompt
        if args.chat:
            prompt = engine.apply_chat_template([{"role": "user", "content": prompt}])
        try:
            last = None
            for chunk in engine.generate(prompt, params, stream=True):
                print(chunk["delta"], end="", flush=True)
                last = chunk
        except InvalidParamError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print()
        reason = last["meta_info"]["finish_reason"] if last else None
        if reason and reason["type"] == "abort":
            print(f"error: {reason.get('message')}", file=sys.stderr)
            return 1
        return 0
    finally:
        engine.shutdown()


def _add_generate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="complete one prompt, streaming the text",
                       usage="gridserve generate PROMPT [options]")
    p.add_argument("prompt", help="the text to complete")
    g = p.add_argument_group("generation options")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the model's chat template (default: on)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--top-k", type=int, default=-1, help="sample from the k likeliest tokens; -1 = all (default)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: the server's --random-seed)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    # quiet by default: the schedulers' log lines would interleave with the streamed answer
    ServerArgs.add_cli_args(p, skip_groups=("server",), defaults={"log_level": "warning"})
    p.set_defaults(func=_generate)
    return p


def _serve(args: argparse.Namespace) -> int:
    from gridserve.launch_plan import dry_run_report

    try:
        server_args = ServerArgs.from_cli_args(args)
        if args.dry_run:  # before anything heavy is imported: no torch, no processes
            print(dry_run_report(server_args))
            return 0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from gridserve.launch_server import run

    return run(server_args)


def add_dry_run_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="print every node's ranks (dp, pp, tp, global rank), GPUs and processes, then exit")


def _add_serve(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (or gRPC with --grpc-mode)",
                       usage="gridserve serve [options]")
    ServerArgs.add_cli_args(p)
    add_dry_run_flag(p)
    p.set_defaults(func=_serve)
    return p


def _reject_unknown(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Exits with the sub-command's usage and the nearest flag for each unknown one (`--modle`: `--model`)."""
    flags = [s for a in parser._actions for s in a.option_strings]
    hints = []
    for arg in unknown:
        close = difflib.get_close_matches(arg.split("=")[0], flags, n=1, cutoff=0.75) if arg.startswith("-") else []
        hints.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    parser.error(f"unrecognized arguments: {', '.join(hints)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gridserve", description="LLM serving engine")
    parser.add_argument("--version", action="version", version=f"gridserve {gridserve.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"serve": _add_serve(sub), "generate": _add_generate(sub)}
    # listed for --help; `gridserve bench ...` itself goes to bench_main before parsing (see below)
    sub.add_parser("bench", help="benchmarks: offline, latency, serving (gridserve bench --help)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser, built only then: the benchmarks import torch
        from gridserve.bench.cli import bench_main

        return bench_main(argv[1:])
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _reject_unknown(commands[args.command], unknown)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
