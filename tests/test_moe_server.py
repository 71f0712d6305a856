"""Mixture-of-experts models end to end: greedy tokens equal Hugging Face transformers' on the same weights,
through the offline Engine (one process) and through servers at tp 2 with ep 2 (overlap loop, chunked prefill)
and two replicas of two pipeline stages (tp 2 x pp 2 is in test_pipeline_parallel.py)."""

import httpx
import pytest
import torch

from gridserve.entrypoints.engine import Engine
from tests.server_utils import ServerProcess
from tests.tiny_models import make_tiny_model, qwen_tokenizer_dir

PROMPTS = [[(11 * i + 7 * j) % 200 + 5 for j in range(6 + 5 * i)] for i in range(4)]
NEW_TOKENS = 12


def _made_with_reference(kind: str, path) -> list[list[int]]:
    """Saves a tiny random `kind` model at path; returns transformers' greedy tokens for PROMPTS."""
    hf = make_tiny_model(kind, path)
    want = []
    with torch.no_grad():
        for p in PROMPTS:
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS,
                              eos_token_id=None, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
    return want


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-moe")
    want = _made_with_reference("qwen3-moe", path)
    args = ("--model", str(path), "--tokenizer-path", qwen_tokenizer_dir(), "--dtype", "float32")  # as saved above
    return args, str(path), want


def _server_ids(server: ServerProcess) -> list[list[int]]:
    body = {"input_ids": PROMPTS, "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                                      "ignore_eos": True}}
    return [r["output_ids"] for r in httpx.post(f"{server.url}/generate", json=body, timeout=120).json()]


def _engine_ids(path: str) -> list[list[int]]:
    with Engine(model_path=path, tokenizer_path=qwen_tokenizer_dir(), dtype="float32", max_total_tokens=2048,
                show_progress=False, log_level="warning") as engine:
        outs = engine.generate(input_ids=PROMPTS, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                                                   "ignore_eos": True})
    return [o["output_ids"] for o in outs]


def test_engine_greedy_equals_transformers(model):
    _, path, want = model
    assert _engine_ids(path) == want


@pytest.mark.parametrize("kind", ["qwen2-moe", "mixtral"])  # a shared expert with its gate; no top-k renorm choice
def test_engine_greedy_equals_transformers_for_the_other_moe_architectures(kind, tmp_path):
    want = _made_with_reference(kind, tmp_path)
    assert _engine_ids(str(tmp_path)) == want


@pytest.mark.parametrize("flags", [
    ("--tp", "2", "--ep", "2", "--enable-overlap-schedule", "--chunked-prefill-size", "8"),
    ("--dp", "2", "--pp", "2", "--load-balance-method", "round_robin"),
], ids=["tp2-ep2-overlap-chunked", "dp2-pp2"])
def test_server_greedy_equals_transformers(model, flags):
    args, _, want = model
    server = ServerProcess(*args, *flags)
    try:
        assert _server_ids(server) == want
    finally:
        server.stop()


def test_ep_that_does_not_divide_tp_is_refused_before_anything_starts(model):
    args, _, _ = model
    bad = ServerProcess(*args, "--tp", "1", "--ep", "2", wait=False)
    try:
        assert bad.proc.wait(60) == 2 and "--ep-size 2 must divide --tp-size 1" in bad.output()
    finally:
        bad.stop()
