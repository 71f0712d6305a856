"""Greedy tokens of two engine configurations on the same (dummy or real) weights: the fraction of positions
that agree, and the mean length of the common prefix. Each side is a list of ServerArgs overrides, e.g.
tp=1 vs tp=2, or eager decode vs CUDA graphs + the overlap loop. Usage:
    python scripts/greedy_agreement.py --model gridserve/configs/llama-3.1-8b --load-format dummy \
        --tokenizer-path TOKENIZER --baseline tp_size=1 --candidate tp_size=2 \
        [--num-prompts 16 --input-len 128 --output-len 64 --output-json F]"""

import argparse
import json

import torch

from gridserve.entrypoints.engine import Engine


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value)
    return out


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model flags of the scripts that start an Engine (this one and bench_burst.py)."""
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--context-length", type=int, default=4096)


def make_engine(args: argparse.Namespace, overrides: dict) -> Engine:
    return Engine(model_path=args.model, load_format=args.load_format, tokenizer_path=args.tokenizer_path,
                  context_length=args.context_length, log_level="warning", show_progress=False, **overrides)


def greedy(args, overrides: dict, prompts: list[list[int]]) -> list[list[int]]:
    engine = make_engine(args, overrides)
    try:
        outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                     "max_new_tokens": args.output_len})
    finally:
        engine.shutdown()
    return [o["output_ids"] for o in outs]


def main() -> None:
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--baseline", nargs="*", default=[], help="ServerArgs overrides, key=value")
    p.add_argument("--candidate", nargs="*", default=[], help="ServerArgs overrides, key=value")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    # varied lengths, so the batch shrinks and CUDA-graph padding is exercised
    prompts = [torch.randint(0, 10000, (args.input_len - 3 * i,), generator=g).tolist()
               for i in range(args.num_prompts)]
    base, cand = parse_overrides(args.baseline), parse_overrides(args.candidate)
    a, b = greedy(args, base, prompts), greedy(args, cand, prompts)
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    total = sum(len(r) for r in a)
    prefix = [next((i for i, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y), len(ra))
              for ra, rb in zip(a, b, strict=True)]
    result = {"baseline": base, "candidate": cand, "positions": total, "agreeing_positions": same,
              "agreement": same / total, "mean_common_prefix": sum(prefix) / len(prefix),
              "identical_sequences": sum(x == y for x, y in zip(a, b, strict=True))}
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
