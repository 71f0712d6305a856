"""How many experts a random prompt reaches in each layer of a random model in the Qwen3-30B-A3B shape: transformers'
classes with the dummy loader's weights (normal(0, 0.02), norms at 1), the first LAYERS layers, on the CPU. Random
routers send most tokens to a few experts, which is why benchmarks on random weights take --moe-routing uniform.

    python scripts/moe_routing_probe.py [--layers 6] [--tokens 256]
"""

import argparse
import json
import os

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

CONFIG = os.path.join(os.path.dirname(__file__), "..", "gridserve", "configs", "qwen3-30b-a3b", "config.json")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--tokens", type=int, default=256)
    a = p.parse_args()
    hf = json.load(open(CONFIG))
    hf.update(num_hidden_layers=a.layers, vocab_size=10000, bos_token_id=None, eos_token_id=None)
    cfg = Qwen3MoeConfig(**{k: v for k, v in hf.items() if k != "architectures"})
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for module in model.modules():
            for p_ in module.parameters(recurse=False):
                norm = "norm" in type(module).__name__.lower()
                p_.copy_(torch.ones_like(p_) if norm else torch.randn_like(p_) * 0.02)
    reached = {}

    def watch(i: int):
        def hook(_module, _inputs, out):
            logits = out[0] if isinstance(out, tuple) else out
            top = torch.topk(logits.float(), cfg.num_experts_per_tok, dim=-1).indices
            reached[i] = (top.unique().numel(), torch.bincount(top.flatten(), minlength=cfg.num_experts).max().item())
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(watch(i))
    ids = torch.randint(0, 10000, (1, a.tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    for i, (n, busiest) in sorted(reached.items()):
        print(f"layer {i}: {n} of {cfg.num_experts} experts reached; the busiest took {busiest} of {a.tokens} tokens")


if __name__ == "__main__":
    main()
