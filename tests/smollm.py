"""Shared fixtures' helpers for tests on the embedded SmolLM2-135M-Instruct GGUF."""

import functools
import os

import torch
from transformers import AutoModelForCausalLM

from gridserve.model_loader.paths import default_model_path

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "List three prime numbers.",
    "Explain what a CPU does in one sentence.",
    "Say hello in Spanish.",
    "What is 12 times 12?",
]
MAX_NEW = 12  # enough to stop some prompts early and run others to the limit; each token is CI time


@functools.cache  # transformers takes ~15 s to dequantize the GGUF on CI's cores: once a session (read-only)
def load_hf_model():
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def hf_greedy(model, input_ids: list[int], max_new: int = MAX_NEW) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([input_ids]), max_new_tokens=max_new, do_sample=False)
    return out[0, len(input_ids):].tolist()


def assert_no_leak(engine) -> dict:
    """When idle, every KV slot is either free or held by the prefix cache, and every request row is free.
    Returns the scheduler's internal state."""
    state = engine.get_server_info()["internal_states"][0]
    assert state["num_running"] == state["num_waiting"] == 0
    assert state["used_tokens"] == 0
    assert state["available_tokens"] + state["cached_tokens"] == state["max_total_num_tokens"]
    assert state["free_req_slots"] == engine.scheduler_info["max_running_requests"]
    return state
