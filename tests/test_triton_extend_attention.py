"""Triton paged extend attention vs a plain-PyTorch reference (runs on CPU under TRITON_INTERPRET=1)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gridserve.attention.triton_ops.extend_attention import extend_attention  # noqa: E402
from tests.paged_kv import extend_reference as reference  # noqa: E402
from tests.paged_kv import make_extend_case  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"


def make_case(*args, **kwargs):
    return make_extend_case(*args, device=DEVICE, **kwargs)


BLOCK = 16  # block_m = block_n in the tests, so short shapes still cover several blocks
SHAPES = [
    # (prefix_lens, extend_lens, num_heads, num_kv_heads, head_dim)
    ([0], [1], 4, 4, 64),
    ([0], [37], 8, 2, 80),  # no prefix, extend over two blocks
    ([5, 0, 40], [1, 20, 3], 8, 2, 64),  # decode-like row, no prefix, prefix over two blocks
    ([21, 3, 0], [18, 33, 1], 8, 1, 80),  # extend > BLOCK_M with a prefix, head_dim not a power of two
    ([50], [9], 4, 4, 80),
]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("prefix_lens,ext_lens,num_heads,num_kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("group_heads", [False, True])  # True: a program per GQA group (groups of 1, 4 and 8 here)
def test_matches_reference(prefix_lens, ext_lens, num_heads, num_kv_heads, head_dim, dtype, atol, group_heads):
    q, k, v, r2t, rpi, sl, el, esl = make_case(prefix_lens, ext_lens, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    res = extend_attention(q, k, v, r2t, rpi, sl, el, esl, scale, max(ext_lens), out=out,
                           config=(BLOCK, BLOCK, 4, 1), group_heads=group_heads)
    assert res is out and res.dtype == dtype
    assert torch.isfinite(out).all(), "output not fully written or poisoned KV leaked"
    ref = reference(q, k, v, r2t, rpi, sl, el, esl, scale)
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=atol)


def test_default_blocks_huge_poison_and_loose_max_extend_len():
    # default block sizes; a poison that would dominate any softmax it leaked into; max_extend_len above the true max
    q, k, v, r2t, rpi, sl, el, esl = make_case([40, 2], [35, 6], 8, 2, 64, torch.float32, seed=1, poison=1e30)
    out = extend_attention(q, k, v, r2t, rpi, sl, el, esl, 0.125, 70)
    assert out.shape == q.shape
    torch.testing.assert_close(out.cpu(), reference(q, k, v, r2t, rpi, sl, el, esl, 0.125), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [(32, 16, 4, 1), (16, 32, 4, 1), (128, 64, 8, 2), (256, 64, 8, 3)])
@pytest.mark.parametrize("group_heads", [False, True])
def test_long_prefix_whole_blocks_and_the_diagonal(config, group_heads):
    """A later chunk of a long prompt: most key blocks are seen whole by every query (the unmasked loop), the
    rest straddle the causal diagonal; block sizes that do not divide the prefix, BLOCK_N above BLOCK_M, and the
    large tiles long extends get by default (grouped: 8 to 64 queries of each of a group's 2 heads a program)."""
    q, k, v, r2t, rpi, sl, el, esl = make_case([203, 0], [150, 70], 4, 2, 64, torch.float32, seed=3, poison=1e30)
    out = extend_attention(q, k, v, r2t, rpi, sl, el, esl, 0.125, 150, config=config, group_heads=group_heads)
    torch.testing.assert_close(out.cpu(), reference(q, k, v, r2t, rpi, sl, el, esl, 0.125), atol=1e-4, rtol=1e-4)


def test_long_extends_take_a_program_per_gqa_group_by_default():
    """max_extend_len from GROUP_HEADS_FROM on: the long-extend tiles, grouped (here 2 heads of a KV head a
    program); the same answer as the reference either way."""
    from gridserve.attention.triton_ops.extend_attention import GROUP_HEADS_FROM, extend_config

    assert extend_config(GROUP_HEADS_FROM) == (256, 64, 8, 3)
    q, k, v, r2t, rpi, sl, el, esl = make_case([203, 0], [150, 70], 4, 2, 64, torch.float32, seed=4, poison=1e30)
    want = reference(q, k, v, r2t, rpi, sl, el, esl, 0.125)
    for max_len in (150, GROUP_HEADS_FROM):  # per head, small tiles; grouped, long-extend tiles
        out = extend_attention(q, k, v, r2t, rpi, sl, el, esl, 0.125, max_len)
        torch.testing.assert_close(out.cpu(), want, atol=1e-4, rtol=1e-4)


def test_fp16_and_zero_extend_row():
    # a request with no new tokens contributes no queries and must not disturb its neighbours
    q, k, v, r2t, rpi, sl, el, esl = make_case([7, 4, 0], [5, 0, 17], 4, 2, 64, torch.float16, seed=2)
    out = torch.full_like(q, float("nan"))
    extend_attention(q, k, v, r2t, rpi, sl, el, esl, 0.125, 17, out=out, config=(BLOCK, BLOCK, 4, 1))
    assert torch.isfinite(out).all()
    ref = reference(q, k, v, r2t, rpi, sl, el, esl, 0.125)
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)
