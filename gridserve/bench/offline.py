"""`gridserve bench offline`: throughput of one in-process Engine on a fixed random workload.

The default workload is nano-vllm's: 256 prompts of random token ids, prompt and output lengths each uniform
in [100, 1024], seed 0, ignore_eos, temperature 0.6. All prompts are submitted at once so the scheduler batches
them continuously. `--compare-transformers` runs Hugging Face `generate` on the same prompts and weights,
one prompt at a time and as one left-padded batch. Unless `--no-floor`, the device's bandwidth and matmul rate
are measured and the workload's floor (gridserve/bench/roofline.py) is printed with the fraction each system achieved.
"""

import argparse
import asyncio
import datetime
import gc
import json
import os
import random
import subprocess
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from gridserve.bench.roofline import (
    ABOVE_FLOOR_NOTE,
    DeviceRates,
    OfflineFloor,
    measure_for,
    offline_floor,
    sync_device,
)
from gridserve.server_args import ServerArgs

# Prompt ids are drawn from [0, min(vocab_size, MAX_TOKEN_ID)): the low ids of every supported tokenizer are
# ordinary tokens, and the range stays inside tiny test vocabularies.
MAX_TOKEN_ID = 10000
DEFAULT_MIN_LEN = 100  # nano-vllm's workload: lengths uniform in [100, 1024]
# The untimed warm-up request: shares no prefix with the random prompts (beyond chance), so the radix cache
# gives the timed requests nothing.
WARMUP_IDS = list(range(16))


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    token_id_range: tuple[int, int]  # prompt ids are drawn uniformly from [low, high)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass
class Result:
    system: str
    wall_s: float
    prompt_tokens: int
    output_tokens: int  # useful output tokens: padded-batch overshoot is not counted

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s

    def as_dict(self) -> dict:
        return {**asdict(self), "output_tok_s": self.output_tok_s, "total_tok_s": self.total_tok_s}


def add_offline_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("workload")
    g.add_argument("--num-prompts", type=int, default=256, help="(default: 256)")
    g.add_argument("--min-input-len", type=int, help="(default: 100, or --max-input-len if that is less)")
    g.add_argument("--max-input-len", type=int, default=1024, help="(default: 1024)")
    g.add_argument("--min-output-len", type=int, help="(default: 100, or --max-output-len if that is less)")
    g.add_argument("--max-output-len", type=int, default=1024, help="(default: 1024)")
    g.add_argument("--seed", type=int, default=0, help="seed of the workload (and of transformers' sampling)")
    g.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    g = parser.add_argument_group("report")
    g.add_argument("--output-json", metavar="PATH", help="write the parameters and results as JSON")
    g.add_argument("--plot", metavar="PATH", help="bar chart of output tok/s per system (PNG; needs matplotlib)")
    g.add_argument("--compare-transformers", nargs="?", const="both", choices=["both", "bs1", "padded"],
                   help="also run Hugging Face transformers generate: prompt by prompt (bs1), as one left-padded "
                        "batch (padded), or both (the default when given without a value). With --load-format "
                        "dummy transformers gets its own random weights of the same shapes (throughput only)")
    g.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the device and report the workload's floor (--no-floor skips it, ~1 s)")
    ServerArgs.add_cli_args(parser)


def validate_workload_args(args: argparse.Namespace) -> None:
    """Raises ValueError naming the first bad workload flag. An unset minimum length becomes
    DEFAULT_MIN_LEN, or the maximum where that is smaller (so a short run needs only the --max-* flags)."""
    for kind in ("input", "output"):
        if getattr(args, f"min_{kind}_len") is None:
            setattr(args, f"min_{kind}_len", min(DEFAULT_MIN_LEN, getattr(args, f"max_{kind}_len")))
    for name in ("num_prompts", "min_input_len", "min_output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for kind in ("input", "output"):
        lo, hi = getattr(args, f"min_{kind}_len"), getattr(args, f"max_{kind}_len")
        if lo > hi:
            raise ValueError(f"--min-{kind}-len ({lo}) must be <= --max-{kind}-len ({hi})")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'gridserve[bench]'") from None


def make_workload(num_prompts: int, input_lens: tuple[int, int], output_lens: tuple[int, int], vocab_size: int,
                  seed: int) -> Workload:
    """Random prompts; lengths are uniform in the inclusive ranges, ids uniform in [0, min(vocab, 10000))."""
    rng = random.Random(seed)
    top = min(vocab_size, MAX_TOKEN_ID)
    prompts, outs = [], []
    for _ in range(num_prompts):
        prompts.append([rng.randrange(top) for _ in range(rng.randint(*input_lens))])
        outs.append(rng.randint(*output_lens))
    return Workload(prompts, outs, (0, top))


def _check_lengths(system: str, got: list[int], want: list[int]) -> None:
    bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    if bad:
        i, g, w = bad[0]
        raise RuntimeError(f"{system}: {len(bad)} requests produced the wrong number of output tokens "
                           f"(e.g. request {i}: {g} instead of {w})")


async def _gridserve_timed(engine, workload: Workload, temperature: float) -> tuple[float, list[dict]]:
    warm = {"max_new_tokens": 4, "temperature": temperature, "ignore_eos": True}
    await engine.async_generate(input_ids=WARMUP_IDS, sampling_params=warm)
    bar = tqdm(total=len(workload.prompts), desc="gridserve", unit="req")

    async def one(ids: list[int], n: int) -> dict:
        params = {"max_new_tokens": n, "temperature": temperature, "ignore_eos": True}
        out = await engine.async_generate(input_ids=ids, sampling_params=params)
        bar.update()
        return out

    start = time.perf_counter()
    outs = await asyncio.gather(*(one(p, n) for p, n in zip(workload.prompts, workload.output_lens, strict=True)))
    wall = time.perf_counter() - start
    bar.close()
    return wall, outs


def run_gridserve(engine, workload: Workload, temperature: float) -> Result:
    """A warm-up request, then every prompt at once; checks each produced exactly its output length."""
    wall, outs = asyncio.run(_gridserve_timed(engine, workload, temperature))
    aborted = [o["meta_info"]["finish_reason"] for o in outs if o["meta_info"]["finish_reason"]["type"] == "abort"]
    if aborted:
        raise RuntimeError(f"gridserve: {len(aborted)} requests were aborted: {aborted[0].get('message')}")
    _check_lengths("gridserve", [len(o["output_ids"]) for o in outs], workload.output_lens)
    return Result("gridserve", wall, workload.prompt_tokens, workload.output_tokens)


def load_hf_model(path: str, dtype: torch.dtype, device: torch.device, random_weights: bool = False):
    """The same checkpoint in transformers: a GGUF file through `gguf_file=`, else the HF folder. With
    random_weights, the folder's config with transformers' own random init (built on the device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gridserve.model_loader.paths import is_gguf

    if random_weights:
        config = AutoConfig.from_pretrained(path) if not is_gguf(path) else \
            AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval()
    if is_gguf(path):
        model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def _hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, n: int, temperature: float, pad_id: int,
                 eos_ids: list[int]) -> torch.Tensor:
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 \
        else {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, min_new_tokens=n, max_new_tokens=n,
                             pad_token_id=pad_id, eos_token_id=eos_ids or None, **sampling)
    return out[:, ids.shape[1]:]


def run_transformers(model, workload: Workload, temperature: float, seed: int, padded: bool,
                     pad_id: int, eos_ids: list[int]) -> Result:
    """Batch 1 (prompt after prompt) or one left-padded batch run to the longest output length."""
    device = model.device
    torch.manual_seed(seed)
    warm = torch.tensor([WARMUP_IDS], device=device)
    _hf_generate(model, warm, torch.ones_like(warm), 4, temperature, pad_id, eos_ids)
    sync_device(device)
    start = time.perf_counter()
    if padded:
        width = max(len(p) for p in workload.prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in workload.prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in workload.prompts], device=device)
        out = _hf_generate(model, ids, mask, max(workload.output_lens), temperature, pad_id, eos_ids)
        got = [min(out.shape[1], n) for n in workload.output_lens]
    else:
        got = []
        for p, n in tqdm(list(zip(workload.prompts, workload.output_lens, strict=True)), desc="transformers bs=1",
                         unit="req"):
            ids = torch.tensor([p], device=device)
            got.append(_hf_generate(model, ids, torch.ones_like(ids), n, temperature, pad_id, eos_ids).shape[1])
    sync_device(device)
    wall = time.perf_counter() - start
    system = "transformers_padded" if padded else "transformers_bs1"
    _check_lengths(system, got, workload.output_lens)
    return Result(system, wall, workload.prompt_tokens, workload.output_tokens)


def print_results(results: list[Result], floor: OfflineFloor | None = None) -> None:
    base = results[0]
    print(f"{'system':<22}{'prompt tok':>12}{'output tok':>12}{'wall s':>10}"
          f"{'output tok/s':>14}{'total tok/s':>13}{'gridserve speed-up':>20}" + (f"{'of floor':>10}" if floor else ""))
    for r in results:
        speedup = f"{base.output_tok_s / r.output_tok_s:.2f}x" if r is not base else ""
        print(f"{r.system:<22}{r.prompt_tokens:>12}{r.output_tokens:>12}{r.wall_s:>10.2f}"
              f"{r.output_tok_s:>14.1f}{r.total_tok_s:>13.1f}{speedup:>20}"
              + (f"{floor.fraction(r.wall_s):>10.1%}" if floor else ""))


def print_floor(floor: OfflineFloor, rates: DeviceRates, max_running: int, results: list[Result]) -> None:
    print(f"floor on {rates.device}: {rates.describe()}")
    print(f"  memory {floor.memory_s:.3f} s ({floor.decode_steps} decode steps at <= {max_running} running + "
          f"{floor.prefill_steps} prefill steps: {floor.weight_bytes / 1e9:.1f} GB weights, "
          f"{floor.kv_bytes / 1e9:.1f} GB KV) + compute {floor.compute_s:.3f} s ({floor.flops / 1e12:.2f} TFLOP)")
    print(f"  floor {floor.floor_s:.3f} s: {floor.output_tok_s:.1f} output tok/s, {floor.total_tok_s:.1f} total tok/s")
    if any(floor.fraction(r.wall_s) > 1 for r in results):
        print(ABOVE_FLOOR_NOTE)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def build_report(args: argparse.Namespace, workload: Workload, model_path: str, dtype: torch.dtype,
                 device: torch.device, results: list[Result], floor: dict | None = None) -> dict:
    keys = ("num_prompts", "min_input_len", "max_input_len", "min_output_len", "max_output_len", "seed",
            "temperature")
    report = {
        "benchmark": "offline",
        "workload": {**{k: getattr(args, k) for k in keys}, "ignore_eos": True,
                     "token_id_range": list(workload.token_id_range), "prompt_tokens": workload.prompt_tokens,
                     "output_tokens": workload.output_tokens},
        "model": model_path,
        "load_format": args.load_format,
        "moe_routing": args.moe_routing,
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch_version": torch.__version__,
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "results": {r.system: r.as_dict() for r in results},
    }
    if floor is not None:
        report["floor"] = floor
    if len(results) > 1:
        import transformers

        report["transformers_version"] = transformers.__version__
    return report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    values = [report["results"][n]["output_tok_s"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(names, values, color=["tab:blue"] + ["tab:gray"] * (len(names) - 1))
    ax.bar_label(bars, fmt="%.1f")
    if "floor" in report:
        top = report["floor"]["output_tok_s"]
        if top <= 20 * max(values):
            ax.axhline(top, color="tab:red", linestyle="--", label=f"floor {top:.1f}")
        else:  # a line far above the bars would squash them: name the floor instead
            ax.plot([], [], color="tab:red", linestyle="--", label=f"floor {top:.1f} (off the chart)")
        ax.legend(loc="upper right")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"offline, {report['workload']['num_prompts']} prompts, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pipeline_clock(engine) -> tuple[float, float] | None:
    """Stage 0's busy and active seconds so far, with pipeline parallelism (else None)."""
    state = engine.get_server_info()["internal_states"][0]
    return (state["pp_busy_s"], state["pp_active_s"]) if "pp_busy_s" in state else None


def _pipeline_idle(engine, before: tuple[float, float] | None) -> float | None:
    """Stage 0's idle fraction since `before`: the pipeline's bubble as the first stage sees it."""
    after = _pipeline_clock(engine)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return max(0.0, 1.0 - (after[0] - before[0]) / (after[1] - before[1]))


def run(args: argparse.Namespace) -> int:
    from gridserve.entrypoints.engine import Engine
    from gridserve.model_executor.model_runner import resolve_device
    from gridserve.model_loader.loader import load_model_config, resolve_dtype, resolve_model_path

    validate_workload_args(args)
    server_args = ServerArgs.from_cli_args(args)
    path = resolve_model_path(server_args.model_path)
    cfg = load_model_config(path)
    engine = Engine(**vars(server_args))
    dtype, device = resolve_dtype(server_args.dtype, cfg), resolve_device(server_args.device, server_args.base_gpu_id)
    max_running = engine.scheduler_info["max_running_requests"]
    workload = make_workload(args.num_prompts, (args.min_input_len, args.max_input_len),
                             (args.min_output_len, args.max_output_len), cfg.vocab_size, args.seed)
    try:
        clock = _pipeline_clock(engine)
        results = [run_gridserve(engine, workload, args.temperature)]
        pp_idle = _pipeline_idle(engine, clock)
        per_replica = [s["num_received"] for s in engine.get_server_info()["internal_states"]]
    finally:
        engine.shutdown()
    del engine  # frees the KV cache before transformers loads its copy of the weights
    gc.collect()
    floor = floor_report = None
    if args.floor and server_args.dp_size > 1:
        print("floor: not modelled for --dp > 1 (it models one replica); run with --dp 1 for it")
    elif args.floor:  # measured now: the engine's processes are gone and transformers is not loaded yet
        cost, rates = measure_for(cfg, dtype, device, server_args.tp_size, server_args.quantization)
        floor = offline_floor(cost, [len(p) for p in workload.prompts], workload.output_lens, rates, max_running,
                              server_args.prefill_token_budget)
    if args.compare_transformers:
        model = load_hf_model(path, dtype, device, random_weights=server_args.load_format == "dummy")
        pad_id = cfg.eos_token_ids[0] if cfg.eos_token_ids else 0
        for padded in {"both": (False, True), "bs1": (False,), "padded": (True,)}[args.compare_transformers]:
            results.append(run_transformers(model, workload, args.temperature, args.seed, padded, pad_id,
                                            cfg.eos_token_ids))
    print(f"requests: {len(workload.prompts)}, prompt tokens: {workload.prompt_tokens}, "
          f"output tokens: {workload.output_tokens}")
    print_results(results, floor)
    if floor is not None:
        print_floor(floor, rates, max_running, results)
        floor_report = {"rates": asdict(rates), "max_running_requests": max_running, **floor.as_dict(),
                        "achieved_fraction": {r.system: floor.fraction(r.wall_s) for r in results}}
    if pp_idle is not None:
        print(f"pipeline stage 0 idle: {pp_idle:.1%} of the time it had work in flight")
    if len(per_replica) > 1:
        print(f"requests per DP replica: {per_replica}")
    report = build_report(args, workload, path, dtype, device, results, floor_report)
    report["pp_stage0_idle_fraction"] = pp_idle
    report["requests_per_replica"] = per_replica
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(report, args.plot)
        print(f"plot written to {args.plot}")
    return 0
