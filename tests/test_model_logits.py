"""Logits of each architecture equal transformers' on the same weights, through the paged KV cache:
one full prefill, a prefill split into cached prefix + extend, and token-by-token decode."""

import pytest
import torch

from gridserve.forward_batch import ForwardMode
from gridserve.model_executor.model_runner import ModelRunner
from gridserve.model_loader.loader import load_model_config
from gridserve.server_args import ServerArgs
from tests.logits_script import forward, make_runner
from tests.tiny_models import CONFIGS, make_tiny_model


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_logits_match_transformers(kind, tmp_path):
    hf = make_tiny_model(kind, tmp_path)
    cfg = load_model_config(str(tmp_path))
    assert (cfg.rope_scaling is not None) == ("rope" in kind or "yarn" in kind)
    runner = make_runner(str(tmp_path))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 211, (n,), generator=g).tolist() for n in (11, 5, 23)]
    with torch.no_grad():
        ref = [hf(torch.tensor([p])).logits[0] for p in prompts]

    # 1. batched full prefill, logits at every position
    rows = [runner.req_to_token_pool.alloc() for _ in prompts]
    out = forward(runner, ForwardMode.EXTEND, rows, prompts, [0, 0, 0], all_logits=True)
    torch.testing.assert_close(out, torch.cat(ref), rtol=1e-4, atol=1e-4)

    # 2. prefix already in the cache (reuse the rows above), extend the rest of each prompt
    rows2 = [runner.req_to_token_pool.alloc() for _ in prompts]
    pool = runner.req_to_token_pool.req_to_token
    cut = [4, 2, 10]
    for r_old, r_new, c in zip(rows, rows2, cut, strict=True):
        pool[r_new, :c] = pool[r_old, :c]
    out = forward(runner, ForwardMode.EXTEND, rows2, [p[c:] for p, c in zip(prompts, cut, strict=True)], cut)
    torch.testing.assert_close(out, torch.stack([r[-1] for r in ref]), rtol=1e-4, atol=1e-4)

    # 3. decode three greedy tokens for all requests at once, against transformers on the grown sequence
    seqs = [list(p) for p in prompts]
    last = out.argmax(-1).tolist()
    for _ in range(3):
        for s, t in zip(seqs, last, strict=True):
            s.append(t)
        out = forward(runner, ForwardMode.DECODE, rows2, [[t] for t in last], [len(s) - 1 for s in seqs])
        with torch.no_grad():
            want = torch.stack([hf(torch.tensor([s])).logits[0, -1] for s in seqs])
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        last = out.argmax(-1).tolist()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes_track_float32(dtype, tmp_path):
    hf = make_tiny_model("qwen3", tmp_path)
    args = ServerArgs(model_path=str(tmp_path), dtype=dtype, device="cpu", max_total_tokens=256,
                      max_running_requests=2, show_progress=False)
    runner = ModelRunner(args, str(tmp_path), load_model_config(str(tmp_path)))
    assert runner.model.lm_head.weight.dtype == getattr(torch, dtype)
    assert runner.kv_cache.k_buffers[0].dtype == getattr(torch, dtype)
    prompt = list(range(5, 40))
    row = runner.req_to_token_pool.alloc()
    out = forward(runner, ForwardMode.EXTEND, [row], [prompt], [0], all_logits=True)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    assert out.dtype == getattr(torch, dtype)  # the model's dtype: the sampler widens them where it must
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.1)


def test_the_lm_head_writes_into_a_given_buffer(tmp_path):
    """compute_logits(hidden, out) fills `out` (the decode graphs share one) with what it would have returned."""
    make_tiny_model("llama", tmp_path)
    args = ServerArgs(model_path=str(tmp_path), dtype="float32", device="cpu", max_total_tokens=256,
                      max_running_requests=2, show_progress=False)
    head = ModelRunner(args, str(tmp_path), load_model_config(str(tmp_path))).model.lm_head
    hidden = torch.randn(3, head.weight.shape[1])
    out = torch.full((3, head.vocab_size), float("nan"))
    got = head.compute_logits(hidden, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, head.compute_logits(hidden), rtol=0, atol=0)
