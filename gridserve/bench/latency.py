"""`gridserve bench latency`: batch-1 time to first token (TTFT) and time per output token (TPOT), measured
on streamed outputs of the real pipeline (scheduler and detokenizer processes)."""

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm

from gridserve.server_args import ServerArgs


def add_latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (random ids)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (ignore_eos)")
    p.add_argument("--num-runs", type=int, default=5, help="timed runs after one warm-up run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    ServerArgs.add_cli_args(p)


def validate_latency_args(args: argparse.Namespace) -> None:
    for name in ("input_len", "output_len", "num_runs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.output_len < 2:
        raise ValueError("--output-len must be >= 2 to measure TPOT")


def one_run(engine, input_ids: list[int], output_len: int) -> tuple[float, float]:
    """Returns (TTFT, TPOT) in seconds for one streamed request."""
    params = {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0}
    start = time.perf_counter()
    first = last = None
    n = 0
    for chunk in engine.generate(input_ids=input_ids, sampling_params=params, stream=True):
        now = time.perf_counter()
        first = first or now
        last, n = now, len(chunk["output_ids"])
    if n != output_len:
        raise RuntimeError(f"expected {output_len} output tokens, got {n}")
    return first - start, (last - first) / (output_len - 1)


def run(args: argparse.Namespace) -> int:
    from gridserve.entrypoints.engine import Engine

    server_args = ServerArgs.from_cli_args(args)
    engine = Engine(**vars(server_args))
    vocab = engine.tokenizer_manager.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    try:
        prompts = [torch.randint(0, min(vocab, 10000), (args.input_len,), generator=g).tolist()
                   for _ in range(args.num_runs + 1)]
        one_run(engine, prompts[0], args.output_len)  # warm-up
        runs = [one_run(engine, p, args.output_len) for p in tqdm(prompts[1:], desc="bench latency")]
    finally:
        engine.shutdown()
    ttft = [r[0] * 1000 for r in runs]
    tpot = [r[1] * 1000 for r in runs]
    result = {"model": server_args.model_path, "load_format": server_args.load_format, "tp_size": args.tp_size,
              "input_len": args.input_len, "output_len": args.output_len, "num_runs": args.num_runs,
              "ttft_ms_median": statistics.median(ttft), "ttft_ms_mean": statistics.mean(ttft),
              "tpot_ms_median": statistics.median(tpot), "tpot_ms_mean": statistics.mean(tpot),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"batch 1, input {args.input_len}, output {args.output_len}, {args.num_runs} runs")
    print(f"  TTFT median {result['ttft_ms_median']:.2f} ms (mean {result['ttft_ms_mean']:.2f})")
    print(f"  TPOT median {result['tpot_ms_median']:.3f} ms (mean {result['tpot_ms_mean']:.3f})")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
