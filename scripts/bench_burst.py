"""A burst through the offline Engine: N one-token requests submitted as one batch, so every one has reached the
scheduler before its first step (over HTTP they arrive as fast as the front end takes them in, and each step
admits whatever came; `gridserve bench serving` measures that case, and arrival order). Reports the prefill steps
the burst took against ceil(N / cap) and TTFT p50 / p99 (the TokenizerManager's, from each request's arrival to
its first token). Usage:
    python scripts/bench_burst.py --model gridserve/configs/qwen3-0.6b --load-format dummy \
        --tokenizer-path TOKENIZER [--num-prompts 2000 --input-len 16 --output-json F] [key=value overrides]"""

import argparse
import json
import math
import statistics

import torch
from greedy_agreement import add_model_args, make_engine, parse_overrides  # this folder's, run as a script


def main() -> None:
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--num-prompts", type=int, default=2000)
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-json", default=None)
    p.add_argument("overrides", nargs="*", help="ServerArgs overrides, key=value")
    args = p.parse_args()
    one = {"max_new_tokens": 1, "ignore_eos": True}
    engine = make_engine(args, parse_overrides(args.overrides))
    try:
        g = torch.Generator().manual_seed(0)
        vocab = engine.tokenizer_manager.vocab_size
        prompts = [torch.randint(3, vocab, (args.input_len,), generator=g).tolist() for _ in range(args.num_prompts)]
        engine.generate(input_ids=prompts[:8], sampling_params=one)  # warm-up
        engine.flush_cache()
        before = engine.get_server_info()
        outs = engine.generate(input_ids=prompts, sampling_params=one)
        after = engine.get_server_info()
        budget = engine.server_args.prefill_token_budget  # new tokens one prefill step may take
    finally:
        engine.shutdown()
    steps = sum(a["prefill_batches_total"] - b["prefill_batches_total"]
                for a, b in zip(after["internal_states"], before["internal_states"], strict=True))
    cap = min(after["max_running_requests"], budget // args.input_len)
    ttft = [o["meta_info"]["ttft"] for o in outs]
    result = {"num_prompts": args.num_prompts, "input_len": args.input_len, "prefill_steps": steps,
              "cap_per_step": cap, "ideal_steps": math.ceil(args.num_prompts / cap),
              "ttft_p50_ms": 1e3 * statistics.median(ttft), "ttft_p99_ms": 1e3 * statistics.quantiles(ttft, n=100)[98]}
    print(f"burst of {args.num_prompts} x {args.input_len} tokens: {steps} prefill steps (ceil(N / cap) = "
          f"{result['ideal_steps']} at {cap} a step), TTFT p50 {result['ttft_p50_ms']:.1f} ms, "
          f"p99 {result['ttft_p99_ms']:.1f} ms")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
