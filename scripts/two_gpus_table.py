"""The table at the end of scripts/device_two_gpus.sh (issue 21): each run on two GPUs against its one-GPU
baseline and its target, from the JSON results in RESULTS_DIR.
    usage: python scripts/two_gpus_table.py RESULTS_DIR"""

import json
import os
import sys

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "gridserve", "configs")


def load(folder: str, name: str) -> dict:
    """A JSON file, or the last line of a JSON-lines file; {} when the run left none."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    return json.loads(lines[-1]) if name.endswith(".jsonl") and lines else json.loads("\n".join(lines) or "{}")


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "not run"


def layers(model: str) -> int:
    with open(os.path.join(CONFIGS, model, "config.json")) as f:
        return json.load(f)["num_hidden_layers"]


def offline_tok_s(d: dict) -> float | None:
    return d.get("results", {}).get("gridserve", {}).get("output_tok_s")


def allreduce_share(folder: str, model: str, tag: str, latency: dict) -> str:
    """Two all-reduces per layer at batch 1 (attention and MLP), against the step they belong to."""
    us = load(folder, f"allreduce_{tag}.json").get("us", {}).get("1")
    if not us or not latency:
        return "not run"
    return f"{2 * layers(model) * us / (1e3 * latency['tpot_ms_median']):.0%}"


def main() -> None:
    d = sys.argv[1]
    rows = []
    dp1, dp2 = load(d, "serving_dp1.jsonl"), load(d, "serving_dp2.jsonl")
    rows.append(("dp 2 / dp 1, Qwen3-0.6B, bench serving at saturation (req/s)",
                 ratio(dp2.get("request_throughput"), dp1.get("request_throughput")), ">= 1.9x"))
    for method in ("cache_aware", "round_robin"):
        g = load(d, f"gsp_{method}.jsonl")
        rows.append((f"dp 2, {method}, shared-prefix dataset: hit rate / output tok/s",
                     f"{g['cache_hit_rate']:.2f} / {g['output_throughput']:,.0f}" if g else "not run", "recorded"))
    lat1, lat2 = load(d, "latency_1x1.json"), load(d, "latency_2x1.json")
    rows.append(("tp 2 / tp 1, Llama-3.1-8B, batch-1 TPOT",
                 ratio(lat2.get("tpot_ms_median"), lat1.get("tpot_ms_median")), "<= 0.62x"))
    off1, off2, offp = (load(d, f"offline_{x}.json") for x in ("1x1", "2x1", "1x2"))
    rows.append(("tp 2 / tp 1, same, bench offline output tok/s", ratio(offline_tok_s(off2), offline_tok_s(off1)),
                 ">= 1.7x"))
    idle = offp.get("pp_stage0_idle_fraction")
    rows.append(("pp 2 / one GPU, same, bench offline; stage 0 idle",
                 ratio(offline_tok_s(offp), offline_tok_s(off1)) + (f"; {idle:.0%} idle" if idle is not None else ""),
                 ">= 1.6x"))
    agree = load(d, "agreement32_tp2.json")
    rows.append(("tp 2 against tp 1: same first 32 greedy tokens (bf16)",
                 f"{agree['identical_sequences']} of 32 prompts" if agree else "not run", ">= 90%"))
    rows.append(("tp 2, Llama-3.1-8B: all-reduce share of a batch-1 step",
                 allreduce_share(d, "llama-3.1-8b", "L", lat2), "one-shot all-reduce if > 25%"))
    m1 = load(d, "latency_M_tp1_ep1.json")
    for tag, name in (("tp2_ep1", "tp 2"), ("tp2_ep2", "tp 2 x ep 2")):
        lat, off = load(d, f"latency_M_{tag}.json"), load(d, f"offline_M_{tag}.json")
        rows.append((f"Qwen3-30B-A3B, {name} / tp 1: batch-1 TPOT; offline; all-reduce share",
                     f"{ratio(lat.get('tpot_ms_median'), m1.get('tpot_ms_median'))}; "
                     f"{ratio(offline_tok_s(off), offline_tok_s(load(d, 'offline_M_tp1_ep1.json')))}; "
                     f"{allreduce_share(d, 'qwen3-30b-a3b', 'M', lat)}", "recorded"))
    print("| run on 2 GPUs | measured | target |")
    print("| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
