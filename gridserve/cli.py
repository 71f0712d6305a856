"""The `gridserve` command: serve, generate, bench."""

import argparse
import sys

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


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="complete one prompt, streaming the text")
    p.add_argument("prompt")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the model's chat template (default on)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    ServerArgs.add_cli_args(p)
    p.set_defaults(func=_generate)


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


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (or gRPC with --grpc-mode)")
    ServerArgs.add_cli_args(p)
    add_dry_run_flag(p)
    p.set_defaults(func=_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gridserve", description="LLM serving engine")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_generate(sub)
    # listed for --help; `gridserve bench ...` itself goes to bench_main before parsing (see below)
    sub.add_parser("bench", help="benchmarks: offline, latency, serving (gridserve bench --help)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser, built only then: the benchmarks import torch
        from gridserve.bench.cli import bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
