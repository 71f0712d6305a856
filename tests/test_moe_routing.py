"""--moe-routing uniform: for benchmarks on random weights, whose routers send most tokens to a few experts, each
token's k experts are spread evenly over all of them (the router still runs; its choice is replaced)."""

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the one-kernel form runs on the interpreter here

import pytest  # noqa: E402
import torch  # noqa: E402

from gridserve.entrypoints.engine import Engine  # noqa: E402
from gridserve.layers.moe import HASH_BYTES, SparseMoeBlock, moe_reference, select_experts, uniform_router_logits  # noqa: E402
from gridserve.layers.norm import RMSNorm  # noqa: E402
from gridserve.models.config import ModelConfig, MoEConfig  # noqa: E402
from gridserve.server_args import ServerArgs  # noqa: E402
from tests.tiny_models import make_tiny_model, qwen_tokenizer_dir  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts,k", [(128, 8), (60, 4), (8, 2), (10, 3)])
def test_each_token_gets_k_evenly_spaced_experts_and_all_experts_get_a_fair_share(experts, k, dtype):
    x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(experts)).to(dtype)
    logits = uniform_router_logits(x, experts, k, dtype)
    weights, ids = select_experts(logits, k, renormalize=False)  # even the softmax over all experts gives 1/k
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / k), atol=1e-3, rtol=0)
    stride = experts // k
    gaps = (ids.sort(-1).values.diff(dim=-1)) % experts
    assert ids.unique(dim=-1).shape == ids.shape and bool(((gaps == stride) | (gaps > stride)).all())
    counts = torch.bincount(ids.flatten(), minlength=experts).float()
    if experts % k == 0:  # every expert can be reached, and is, about evenly (random offsets)
        mean = 2048 * k / experts
        assert counts.min() > 0.6 * mean and counts.max() < 1.4 * mean
    assert torch.equal(uniform_router_logits(x, experts, k, dtype), logits)  # a function of the hidden state


def test_the_block_runs_its_experts_on_the_uniform_choice_not_the_routers():
    torch.manual_seed(0)
    block = SparseMoeBlock(32, 8, 2, 16, renormalize=True, uniform_routing=True)
    for p in block.parameters():
        p.data.normal_(0, 0.2)
    block.experts.local_ids = torch.arange(8)
    x, res = torch.randn(5, 32), torch.randn(5, 32)
    norm = RMSNorm(32, eps=1e-6)
    y, residual = block.forward_after_norm(x, res, norm)
    h = norm(x + res)
    weights, ids = select_experts(uniform_router_logits(h, 8, 2, h.dtype), 2, True)
    want = moe_reference(h, block.experts.w13_weight, block.experts.w2_weight, weights, ids)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(residual, x + res)
    _, router_ids = select_experts(block.gate(h), 2, True)
    assert not torch.equal(router_ids.sort(-1).values, ids.sort(-1).values)  # the router's own choice is not used


def _parse(argv: list[str]) -> ServerArgs:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))


def test_the_flag_reaches_an_moe_config_only():
    assert _parse(["--moe-routing", "uniform"]).moe_routing == "uniform"
    assert _parse([]).moe_routing == "model"
    with pytest.raises(SystemExit):
        _parse(["--moe-routing", "random"])
    moe = MoEConfig(8, 2, 16, True, (0,))
    cfg = ModelConfig("Qwen3MoeForCausalLM", "qwen3_moe", 32, 64, 1, 4, 2, 8, 100, 1e-6, 1e4, None, 64, False, False,
                      True, torch.float32, moe=moe)
    assert cfg.with_moe_routing("uniform").moe.uniform_routing and not cfg.with_moe_routing("model").moe.uniform_routing
    dense = cfg.__class__(**{**cfg.__dict__, "moe": None})
    assert dense.with_moe_routing("uniform") is dense


def test_an_engine_with_uniform_routing_generates(tmp_path):
    make_tiny_model("qwen3-moe", tmp_path)
    outs = []
    for routing in ("uniform", "uniform", "model"):
        with Engine(model_path=str(tmp_path), tokenizer_path=qwen_tokenizer_dir(), dtype="float32",
                    max_total_tokens=1024, show_progress=False, log_level="warning", moe_routing=routing) as engine:
            out = engine.generate(input_ids=[[5, 6, 7, 8, 9, 10]], sampling_params={
                "temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
        outs.append(out[0]["output_ids"])
    assert len(outs[0]) == 8 and outs[0] == outs[1]  # deterministic
    assert outs[0] != outs[2]  # and not the router's choice


@pytest.mark.parametrize("experts,k,dtype,hidden", [(128, 8, torch.bfloat16, 24), (10, 3, torch.float32, 24),
                                                    (8, 2, torch.bfloat16, 8)])  # 16 bytes a row: fewer than hashed
def test_the_one_kernel_form_gives_the_same_logits(experts, k, dtype, hidden):
    """fused_moe.uniform_logits (what CUDA runs; here under TRITON_INTERPRET=1) against the PyTorch form."""
    pytest.importorskip("triton")
    from gridserve.layers.fused_moe import uniform_logits

    x = torch.randn(300, hidden, generator=torch.Generator().manual_seed(3)).to(dtype)
    on = x.to("cuda") if os.environ.get("TRITON_INTERPRET") != "1" else x  # the GPU machine runs it on CUDA
    got = uniform_logits(on, experts, k, dtype, HASH_BYTES).cpu()
    assert torch.equal(got, uniform_router_logits(x, experts, k, dtype))
    assert uniform_logits(on[:0], experts, k, dtype, HASH_BYTES).shape == (0, experts)
