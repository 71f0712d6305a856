"""Tensor parallelism on CPU (gloo, float32): logits with tp > 1 equal tp = 1, including a model with fewer KV
heads than ranks (replicated KV heads) and a vocabulary that does not divide by tp (211 is prime)."""

import pytest
import torch
import torch.multiprocessing as mp

from tests.logits_script import make_runner, run_script
from tests.server_utils import free_port
from tests.tiny_models import make_tiny_model
from tests.tp_worker import logits_worker


@pytest.mark.parametrize("kind, tp, load_format", [
    ("llama", 2, "auto"), ("llama3-rope", 2, "auto"), ("qwen2", 2, "auto"), ("qwen3", 2, "auto"),
    ("qwen3-yarn", 2, "auto"), ("qwen3", 4, "auto"),
    ("qwen2", 2, "dummy"),  # random benchmark weights are the same model at every tp
])
def test_tp_logits_equal_tp1(kind, tp, load_format, tmp_path):
    make_tiny_model(kind, tmp_path / "model")
    want = run_script(make_runner(str(tmp_path / "model"), 1, load_format))
    result = tmp_path / "tp.pt"
    mp.start_processes(logits_worker, args=(tp, f"127.0.0.1:{free_port()}", str(tmp_path / "model"),
                                            str(result), load_format), nprocs=tp, start_method="spawn")
    got = torch.load(result)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_bad_split_is_reported_with_numbers(tmp_path):
    make_tiny_model("llama", tmp_path)  # 4 attention heads, 2 KV heads
    from gridserve.model_loader.loader import load_model_config

    cfg = load_model_config(str(tmp_path))
    with pytest.raises(ValueError, match="--tp-size 3 does not divide num_attention_heads 4"):
        cfg.check_parallel(3)
    cfg.num_attention_heads = 6
    with pytest.raises(ValueError, match="larger than num_key_value_heads 2 but not a multiple"):
        cfg.check_parallel(3)
    cfg.check_parallel(2)
