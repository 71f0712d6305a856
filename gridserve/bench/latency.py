"""`gridserve bench latency`: time to first token (TTFT) and time per output token (TPOT) of one batch (one
request by default; `--batch-size N` sends N at once, prefilled together and decoded in lockstep, as SGLang's
bench_one_batch does), measured on streamed outputs of the real pipeline (scheduler and detokenizer processes).
Unless `--no-floor`, the device is measured and the floors (gridserve/bench/roofline.py) are printed with the
fraction achieved."""

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from gridserve.bench.roofline import ABOVE_FLOOR_NOTE, latency_floor, measure_for
from gridserve.server_args import ServerArgs


def add_latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (random ids)")
    p.add_argument("--output-len", type=int, default=128, help="output tokens (ignore_eos)")
    p.add_argument("--batch-size", type=int, default=1, help="requests sent at once in each run")
    p.add_argument("--num-runs", type=int, default=5, help="timed runs after one warm-up run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the device and report the TTFT / TPOT floors (--no-floor skips it, ~1 s)")
    ServerArgs.add_cli_args(p)


def validate_latency_args(args: argparse.Namespace) -> None:
    for name in ("input_len", "output_len", "num_runs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.output_len < 2:
        raise ValueError("--output-len must be >= 2 to measure TPOT")


async def _stream(engine, input_ids: list[int], output_len: int, start: float) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds of one streamed request sent at `start`."""
    params = {"max_new_tokens": output_len, "ignore_eos": True, "temperature": 0}
    first = last = None
    n = 0
    async for chunk in await engine.async_generate(input_ids=input_ids, sampling_params=params, stream=True):
        now = time.perf_counter()
        first = first or now
        last, n = now, len(chunk["output_ids"])
    if n != output_len:
        raise RuntimeError(f"expected {output_len} output tokens, got {n}")
    return first - start, (last - first) / (output_len - 1)


def one_run(engine, batch: list[list[int]], output_len: int) -> tuple[float, float]:
    """Sends the batch's prompts at once; returns (TTFT of the batch: its last first token, mean TPOT) in seconds."""
    async def run_batch():
        start = time.perf_counter()
        return await asyncio.gather(*(_stream(engine, ids, output_len, start) for ids in batch))

    times = asyncio.run(run_batch())
    return max(t for t, _ in times), statistics.mean(t for _, t in times)


def report_floor(args: argparse.Namespace, server_args: ServerArgs, result: dict) -> dict:
    """Measures the device, prints the batch's floors and the fraction achieved; returns them for the JSON."""
    from gridserve.model_executor.model_runner import resolve_device
    from gridserve.model_loader.loader import load_model_config, resolve_dtype, resolve_model_path

    cfg = load_model_config(resolve_model_path(server_args.model_path))
    device = resolve_device(server_args.device, server_args.base_gpu_id)
    cost, rates = measure_for(cfg, resolve_dtype(server_args.dtype, cfg), device, server_args.tp_size,
                              server_args.quantization)
    floor = latency_floor(cost, args.input_len, args.output_len, rates, args.batch_size)
    ttft_ms, tpot_ms = floor.ttft_s * 1e3, floor.tpot_s * 1e3
    ttft_frac, tpot_frac = ttft_ms / result["ttft_ms_median"], tpot_ms / result["tpot_ms_median"]
    print(f"floor on {rates.device}: {rates.describe()}")
    print(f"  TTFT floor {ttft_ms:.3f} ms (achieved {ttft_frac:.1%}), TPOT floor {tpot_ms:.3f} ms "
          f"(achieved {tpot_frac:.1%}): {floor.weight_bytes / 1e9:.3f} GB weights + {floor.kv_bytes / 1e6:.2f} MB "
          "KV read per decode step")
    if max(ttft_frac, tpot_frac) > 1:
        print(ABOVE_FLOOR_NOTE)
    return {"rates": asdict(rates), "ttft_ms": ttft_ms, "tpot_ms": tpot_ms, "weight_bytes": floor.weight_bytes,
            "kv_bytes_per_step": floor.kv_bytes, "ttft_fraction": ttft_frac, "tpot_fraction": tpot_frac}


def run(args: argparse.Namespace) -> int:
    from gridserve.entrypoints.engine import Engine

    server_args = ServerArgs.from_cli_args(args)
    engine = Engine(**vars(server_args))
    vocab = engine.tokenizer_manager.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    try:
        prompts = [[torch.randint(0, min(vocab, 10000), (args.input_len,), generator=g).tolist()
                    for _ in range(args.batch_size)] for _ in range(args.num_runs + 1)]
        one_run(engine, prompts[0], args.output_len)  # warm-up
        runs = [one_run(engine, p, args.output_len) for p in tqdm(prompts[1:], desc="bench latency")]
    finally:
        engine.shutdown()
    ttft = [r[0] * 1000 for r in runs]
    tpot = [r[1] * 1000 for r in runs]
    result = {"model": server_args.model_path, "load_format": server_args.load_format,
              "moe_routing": server_args.moe_routing, "tp_size": args.tp_size,
              "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
              "num_runs": args.num_runs,
              "ttft_ms_median": statistics.median(ttft), "ttft_ms_mean": statistics.mean(ttft),
              "tpot_ms_median": statistics.median(tpot), "tpot_ms_mean": statistics.mean(tpot),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"batch {args.batch_size}, input {args.input_len}, output {args.output_len}, {args.num_runs} runs")
    print(f"  TTFT median {result['ttft_ms_median']:.2f} ms (mean {result['ttft_ms_mean']:.2f})")
    print(f"  TPOT median {result['tpot_ms_median']:.3f} ms (mean {result['tpot_ms_mean']:.3f})")
    if args.floor:  # measured after shutdown, so the engine's processes do not compete for the device
        result["floor"] = report_floor(args, server_args, result)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
