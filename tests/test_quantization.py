"""FP8 weights (--quantization fp8): the quantizers, the FP8 linear, online quantization of a float checkpoint,
and loading a checkpoint already in FP8 (HF fine-grained FP8: 128 x 128 blocks with weight_scale_inv)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gridserve.forward_batch import ForwardMode
from gridserve.layers.linear import LinearBase, apply_linear
from gridserve.layers.quantization import (
    DECODE_GEMM_MAX_M,
    FP8,
    checkpoint_quantization,
    dequantize_fp8_checkpoint,
    fp8_linear,
    quantize_per_channel,
    quantize_per_token,
)
from gridserve.model_executor.model_runner import ModelRunner
from gridserve.model_loader.loader import load_model_config
from gridserve.preflight import StartupError, check_model
from gridserve.server_args import ServerArgs
from tests.logits_script import forward
from tests.tiny_models import make_tiny_model

# FP8 e4m3 keeps 3 mantissa bits: a value rounds within 1/16 of itself; a dot product's errors partly cancel
REL = 1 / 16


def test_quantizers_round_trip_within_fp8_precision():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-2, 2, 48)[:, None]  # rows of very different scales
    q, scale = quantize_per_channel(w)
    assert q.dtype == FP8 and scale.shape == (48,)
    assert ((q.float() * scale[:, None] - w).abs() <= REL * w.abs() + 1e-6 * scale[:, None]).all()
    assert (q.float().abs().amax(dim=1) == 448).all()  # each row uses the whole range
    x = torch.randn(5, 64, generator=g)
    x[2] = 0  # an all-zero token must not divide by zero
    q, scale = quantize_per_token(x)
    assert scale.shape == (5, 1) and torch.isfinite(scale).all()
    assert ((q.float() * scale - x).abs() <= REL * x.abs() + 1e-6).all()


def test_fp8_linear_tracks_the_float_product():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(7, 3, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    qw, scale = quantize_per_channel(w)
    got = fp8_linear(x, qw, scale, b)
    want = torch.nn.functional.linear(x, w, b)
    assert got.shape == (7, 3, 32) and got.dtype == x.dtype
    assert (got - want).norm() / want.norm() < 0.05


def test_online_fp8_quantizes_the_experts_too(tmp_path):
    from gridserve.layers.moe import FusedMoE

    make_tiny_model("qwen3-moe", tmp_path)
    exact = _logits(_runner(tmp_path), PROMPT)
    runner = _runner(tmp_path, quantization="fp8")
    experts = [m for m in runner.model.modules() if isinstance(m, FusedMoE)]
    assert len(experts) == 2  # the sparse layers (layer 1 is dense)
    for m in experts:
        assert m.w13_weight.dtype == FP8 and m.w13_scale.shape == m.w13_weight.shape[:2]
        assert m.w2_weight.dtype == FP8 and m.w2_scale.shape == m.w2_weight.shape[:2]
    gates = [m.gate for m in runner.model.modules() if hasattr(m, "gate") and isinstance(m.gate, LinearBase)]
    assert gates and all(g.weight_scale is None for g in gates)  # the router stays exact
    cos = torch.nn.functional.cosine_similarity(_logits(runner, PROMPT), exact, dim=-1)
    # FP8's error; where it flips which experts a token reaches, one position moves further
    assert cos.median() > 0.99 and cos.min() > 0.8


def _fp8_block_checkpoint(src, dst, block: int = 32) -> dict[str, torch.Tensor]:
    """Rewrites the tiny model at `src` as an HF fine-grained FP8 checkpoint at `dst` (the decoder layers' linears
    in FP8 blocks of `block` x `block`, each with its weight_scale_inv); a block smaller than the usual 128 so the
    tiny weights span several blocks, partial ones included. Returns the checkpoint's values in float32."""
    cfg = json.load(open(src / "config.json"))
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    dst.mkdir()
    json.dump(cfg, open(dst / "config.json", "w"))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    out, values = {}, {}
    for name, t in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            rows, cols = t.shape
            rb, cb = -(-rows // block), -(-cols // block)
            padded = torch.zeros(rb * block, cb * block)
            padded[:rows, :cols] = t
            blocks = padded.view(rb, block, cb, block)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448
            q = (blocks / scale[:, None, :, None]).view(rb * block, cb * block)[:rows, :cols].to(FP8)
            out[name], out[name + "_scale_inv"] = q, scale
            padded = torch.zeros(rb * block, cb * block)
            padded[:rows, :cols] = q.float()
            values[name] = (padded.view(rb, block, cb, block) * scale[:, None, :, None]).view(
                rb * block, cb * block)[:rows, :cols]
        else:
            out[name] = values[name] = t
    save_file(out, dst / "model.safetensors")
    return values


def _runner(path, **kw) -> ModelRunner:
    args = ServerArgs(model_path=str(path), dtype="float32", device="cpu", max_total_tokens=512,
                      max_running_requests=4, show_progress=False, **kw)
    return ModelRunner(args, str(path), load_model_config(str(path)))


def _logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    row = runner.req_to_token_pool.alloc()
    return forward(runner, ForwardMode.EXTEND, [row], [prompt], [0], all_logits=True)


def _fp8_linears(runner: ModelRunner) -> list[LinearBase]:
    return [m for m in runner.model.modules() if isinstance(m, LinearBase) and m.weight_scale is not None]


PROMPT = list(range(5, 45))


def _simulated_fp8_linear(x, weight, weight_scale, bias=None):
    """W8A8 spelled out in float: the same quantized inputs and weights, dequantized, multiplied exactly."""
    q, x_scale = quantize_per_token(x.reshape(-1, x.shape[-1]))
    y = torch.nn.functional.linear(q.double() * x_scale.double(), weight.double() * weight_scale.double()[:, None],
                                   None if bias is None else bias.double())
    return y.to(x.dtype).view(*x.shape[:-1], -1)


def test_online_fp8_quantizes_the_decoder_linears_and_computes_w8a8(tmp_path, monkeypatch):
    make_tiny_model("qwen3", tmp_path)
    exact = _logits(_runner(tmp_path), PROMPT)
    runner = _runner(tmp_path, quantization="fp8")
    quantized = _fp8_linears(runner)
    assert len(quantized) == 3 * 4  # q/k/v, o, gate/up, down in each of 3 layers; not the LM head
    assert all(m.weight.dtype == FP8 for m in quantized) and runner.model.lm_head.weight.dtype == torch.float32
    got = _logits(runner, PROMPT)
    monkeypatch.setattr("gridserve.layers.linear.fp8_linear", _simulated_fp8_linear)
    simulated = _logits(runner, PROMPT)
    torch.testing.assert_close(got, simulated, rtol=1e-4, atol=1e-4)
    # FP8's own error, through 3 layers of a random model whose weights are wider than a trained one's
    assert torch.nn.functional.cosine_similarity(got, exact, dim=-1).min() > 0.95


def test_an_fp8_checkpoint_loads_as_fp8_and_equals_its_dequantized_weights_quantized_online(tmp_path):
    make_tiny_model("llama", tmp_path / "float")
    values = _fp8_block_checkpoint(tmp_path / "float", tmp_path / "fp8")
    assert checkpoint_quantization(load_model_config(str(tmp_path / "fp8")).hf_config) == "fp8"
    runner = _runner(tmp_path / "fp8")  # no flag: the checkpoint says fp8
    assert len(_fp8_linears(runner)) == 3 * 4
    # the same weights, dequantized, as a float checkpoint: quantized online, it is the same model
    deq = dict(dequantize_fp8_checkpoint(load_file(tmp_path / "fp8" / "model.safetensors").items(), (32, 32),
                                         torch.float32))
    assert deq.keys() == values.keys()
    for name, v in values.items():
        torch.testing.assert_close(deq[name], v, rtol=1e-6, atol=0)
    (tmp_path / "deq").mkdir()
    cfg = json.load(open(tmp_path / "fp8" / "config.json"))
    del cfg["quantization_config"]
    json.dump(cfg, open(tmp_path / "deq" / "config.json", "w"))
    save_file(values, tmp_path / "deq" / "model.safetensors")
    want = _logits(_runner(tmp_path / "deq", quantization="fp8"), PROMPT)
    torch.testing.assert_close(_logits(runner, PROMPT), want, rtol=1e-5, atol=1e-5)


def test_dequantize_waits_for_a_scale_that_comes_later_and_names_a_missing_one():
    w = torch.tensor([[1.0, -2.0], [4.0, 8.0]]).to(FP8)
    s = torch.tensor([[0.5]])
    later = list(dequantize_fp8_checkpoint([("a.weight", w), ("b.bias", torch.ones(2)), ("a.weight_scale_inv", s)],
                                           (128, 128), torch.float32))
    assert [n for n, _ in later] == ["b.bias", "a.weight"]
    torch.testing.assert_close(later[1][1], torch.tensor([[0.5, -1.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match="a.weight"):
        list(dequantize_fp8_checkpoint([("a.weight", w)], (128, 128), torch.float32))


def test_unsupported_quantizations_are_clear_start_up_errors(tmp_path):
    with pytest.raises(ValueError, match="--quantization must be one of"):
        ServerArgs(quantization="int4")
    make_tiny_model("llama", tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(StartupError, match="quantized with 'awq'"):
        check_model(ServerArgs(model_path=str(tmp_path), device="cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._scaled_mm on the GPU")
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
def test_fp8_linears_on_cuda_compute_w8a16_for_decode_and_w8a8_beyond(tokens):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, 4096, device="cuda", generator=g).bfloat16()
    w = torch.randn(1024, 4096, device="cuda", generator=g).bfloat16() / 64
    qw, scale = quantize_per_channel(w)
    got = apply_linear(x, qw, scale)
    if tokens <= DECODE_GEMM_MAX_M:  # decode: the activations are not quantized (weight-only kernel)
        want = x.double() @ (qw.double() * scale.double()[:, None]).T
    else:
        want = _simulated_fp8_linear(x, qw, scale)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
