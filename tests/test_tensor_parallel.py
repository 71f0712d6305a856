"""Tensor parallelism on CPU (gloo, float32): logits with tp > 1 equal tp = 1, including a model with fewer KV
heads than ranks (replicated KV heads) and a vocabulary that does not divide by tp (211 is prime)."""

import pytest
import torch
import torch.multiprocessing as mp

from tests.logits_script import make_runner, run_script
from tests.server_utils import free_port
from tests.tiny_models import make_tiny_model
from tests.tp_worker import logits_worker


@pytest.mark.parametrize("kind, tp, load_format, ep", [
    ("llama", 2, "auto", 1), ("llama3-rope", 2, "auto", 1), ("qwen2", 2, "auto", 1), ("qwen3", 2, "auto", 1),
    ("qwen3-yarn", 2, "auto", 1), ("qwen3", 4, "auto", 1),
    ("qwen2", 2, "dummy", 1),  # random benchmark weights are the same model at every tp
    # mixtures of experts: each expert split over tp (ep 1), or whole experts per rank (ep = tp), or both
    ("qwen3-moe", 2, "auto", 1), ("qwen3-moe", 2, "auto", 2), ("qwen2-moe", 2, "auto", 2), ("mixtral", 4, "auto", 2),
    ("qwen3-moe", 2, "dummy", 2),
])
def test_tp_logits_equal_tp1(kind, tp, load_format, ep, tmp_path):
    make_tiny_model(kind, tmp_path / "model")
    want = run_script(make_runner(str(tmp_path / "model"), 1, load_format))
    result = tmp_path / "tp.pt"
    mp.start_processes(logits_worker, args=(tp, f"127.0.0.1:{free_port()}", str(tmp_path / "model"),
                                            str(result), load_format, 1, None, False, ep), nprocs=tp,
                       start_method="spawn")
    got = torch.load(result)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, tp, ep", [("qwen3", 2, 1), ("qwen3-moe", 2, 2)])
def test_fp8_over_tp_tracks_fp8_in_one_process(kind, tp, ep, tmp_path):
    """--quantization fp8 quantizes each rank's slice. Column-parallel rows keep tp 1's scales; a row-parallel
    layer's rows and its tokens are scaled over the rank's half of the inputs, so the result is close, not equal."""
    make_tiny_model(kind, tmp_path / "model")
    want = run_script(make_runner(str(tmp_path / "model"), 1, quantization="fp8"))
    result = tmp_path / "tp.pt"
    mp.start_processes(logits_worker, args=(tp, f"127.0.0.1:{free_port()}", str(tmp_path / "model"),
                                            str(result), "auto", 1, None, False, ep, "fp8"), nprocs=tp,
                       start_method="spawn")
    got = torch.load(result)
    cos = torch.cat([torch.nn.functional.cosine_similarity(g, w, dim=-1) for g, w in zip(got, want, strict=True)])
    assert cos.median() > 0.99 and cos.min() > 0.8  # the MoE model: where a token's experts flip, further


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


def test_bad_expert_splits_are_reported_with_numbers(tmp_path):
    make_tiny_model("mixtral", tmp_path)  # 4 experts of intermediate size 48
    from gridserve.model_loader.loader import load_model_config

    cfg = load_model_config(str(tmp_path))
    with pytest.raises(ValueError, match="--ep-size 3 must divide --tp-size 4"):
        cfg.check_parallel(4, ep=3)
    cfg.check_parallel(4, ep=4)
    with pytest.raises(ValueError, match="--ep-size 2: LlamaForCausalLM has no experts"):
        load_model_config_of("llama", tmp_path / "dense").check_parallel(2, ep=2)


def load_model_config_of(kind: str, path):
    from gridserve.model_loader.loader import load_model_config

    make_tiny_model(kind, path)
    return load_model_config(str(path))
