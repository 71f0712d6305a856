"""Greedy tokens of tp=1 against tp=N on the same (dummy or real) weights: the fraction of positions that
agree, and the mean length of the common prefix. Usage:
    python scripts/tp_agreement.py --tp 2 --model gridserve/configs/llama-3.1-8b --load-format dummy \
        --tokenizer-path TOKENIZER [--num-prompts 16 --input-len 128 --output-len 64 --output-json F]"""

import argparse
import json

import torch

from gridserve.entrypoints.engine import Engine


def greedy(args, tp: int, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine(model_path=args.model, load_format=args.load_format, tokenizer_path=args.tokenizer_path,
                    tp_size=tp, context_length=4096, log_level="warning", show_progress=False)
    try:
        outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "ignore_eos": True,
                                                                     "max_new_tokens": args.output_len})
    finally:
        engine.shutdown()
    return [o["output_ids"] for o in outs]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--tokenizer-path", default=None)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 10000, (args.input_len,), generator=g).tolist() for _ in range(args.num_prompts)]
    a, b = greedy(args, 1, prompts), greedy(args, args.tp, prompts)
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    total = sum(len(r) for r in a)
    prefix = [next((i for i, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y), len(ra))
              for ra, rb in zip(a, b, strict=True)]
    result = {"tp": args.tp, "positions": total, "agreeing_positions": same, "agreement": same / total,
              "mean_common_prefix": sum(prefix) / len(prefix),
              "identical_sequences": sum(x == y for x, y in zip(a, b, strict=True))}
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
