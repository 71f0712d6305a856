"""The decode GEMM (gridserve/layers/decode_gemm.py) and linear.apply_linear's choice of kernel, against the
unfused PyTorch products: on CPU under TRITON_INTERPRET=1 (on a GPU machine without it, on CUDA, bf16 included)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gridserve.layers import activation  # noqa: E402
from gridserve.layers.decode_gemm import FEW_ROWS_TILES, ONE_ROW_TILES, decode_linear, decode_linear_after_norm  # noqa: E402
from gridserve.layers.norm import RMSNorm  # noqa: E402
from tests.test_fused_ops import DEVICE, TOL, rand  # noqa: E402

# The interpreter's tl.dot on bfloat16 operands is wrong (errors of 1e8 even with bf16 weights): bf16 on the GPU only
DECODE_GEMM_DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DECODE_GEMM_DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 40, 96, False), (5, 100, 300, True), (16, 64, 1024, True)])
def test_w8a16_linear_widens_fp8_weights_in_the_kernel(dtype, m, n, k, bias):
    from gridserve.layers.quantization import quantize_per_channel

    w = torch.randn(n, k)
    q, scale = quantize_per_channel(w)
    x = rand(m, k, dtype=dtype)
    b = rand(n, dtype=dtype) if bias else None
    got = decode_linear(x, q.to(DEVICE), scale.to(DEVICE), b, config=(16, 64, 4, 2))
    want = x.float().cpu() @ (q.float() * scale[:, None]).T + (b.float().cpu() if bias else 0)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]  # sums over 1,024 products
    torch.testing.assert_close(got.float().cpu(), want, **tol)
    with pytest.raises(ValueError, match="at most 16 rows"):
        decode_linear(rand(17, k, dtype=dtype), q.to(DEVICE), scale.to(DEVICE))


@pytest.mark.parametrize("dtype", DECODE_GEMM_DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 40, 96, False), (7, 100, 300, True)])
def test_decode_linear_takes_weights_in_the_activations_dtype(dtype, m, n, k, bias):
    w, x = rand(n, k, dtype=dtype), rand(m, k, dtype=dtype)
    b = rand(n, dtype=dtype) if bias else None
    got = decode_linear(x, w, None, b, config=(16, 64, 4, 2))
    want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(got.float(), want, **tol)
    with pytest.raises(ValueError, match="only an FP8 weight"):
        decode_linear(x, w, torch.ones(n, device=DEVICE))


@pytest.mark.parametrize("dtype", DECODE_GEMM_DTYPES)
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (6, 72, 600)])  # 600 ends mid-block: the up half's mask
def test_decode_linear_with_a_gated_input_is_silu_and_mul_then_the_product(dtype, fp8, m, n, k):
    from gridserve.layers.quantization import quantize_per_channel

    x = rand(m, 2 * k, dtype=dtype)
    w = torch.randn(n, k) / 8
    if fp8:
        q, scale = quantize_per_channel(w)
        got = decode_linear(x, q.to(DEVICE), scale.to(DEVICE), gated=True, config=(16, 64, 4, 2))
        w = q.float() * scale[:, None]
    else:
        got = decode_linear(x, w.to(dtype).to(DEVICE), gated=True, config=(16, 64, 4, 2))
        w = w.to(dtype).float()
    want = activation.silu_and_mul(x.cpu()).float() @ w.T  # the activation rounded to x's dtype, as unfused
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    assert got.shape == (m, n)
    torch.testing.assert_close(got.float().cpu(), want, **tol)
    with pytest.raises(ValueError, match="input width"):
        decode_linear(x, w.to(dtype).to(DEVICE))  # x's full width is not the weight's


@pytest.mark.parametrize("rows,k,gated", [(1, 96, True), (3, 4096, False), (1, 64, False), (4, 64, False),
                                          (20, 96, True)])
def test_apply_linear_equals_the_unfused_product_on_every_path(rows, k, gated):
    """On CUDA the first three cases run the decode GEMM (a gated row; K >= DECODE_GEMM_MIN_K; one row), the last
    two cuBLAS (the last after silu_and_mul); on CPU all run in torch."""
    from gridserve.layers.linear import apply_linear

    x = rand(2, rows, 2 * k if gated else k, dtype=torch.float32)  # (batch, tokens, features): any leading shape
    w, b = rand(24, k, dtype=torch.float32), rand(24, dtype=torch.float32)
    want = torch.nn.functional.linear(activation.silu_and_mul(x.cpu()) if gated else x.cpu(), w.cpu(), b.cpu())
    got = apply_linear(x, w, None, b, gated=gated)
    assert got.shape == (2, rows, 24)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DECODE_GEMM_DTYPES)
@pytest.mark.parametrize("fp8", [False, True])
# 300, 200: the last block is partial; 600 over 24 rows: 2 programs share out 5 pieces of the normed input
@pytest.mark.parametrize("m,n,k,has_res,bias", [(1, 40, 96, True, False), (5, 72, 300, True, True),
                                                 (3, 24, 200, False, False), (1, 24, 600, True, False)])
def test_decode_linear_after_norm_is_rms_norm_then_the_product(dtype, fp8, m, n, k, has_res, bias):
    from gridserve.layers.quantization import quantize_per_channel

    x, res = rand(m, k, dtype=dtype), rand(m, k, dtype=dtype) if has_res else None
    norm = RMSNorm(k, eps=1e-5)
    norm.weight.data = (torch.rand(k) + 0.5).to(dtype)
    b = rand(n, dtype=dtype) if bias else None
    w = torch.randn(n, k) / 8
    if fp8:
        q, scale = quantize_per_channel(w)
        args, w = (q.to(DEVICE), scale.to(DEVICE)), q.float() * scale[:, None]
    else:
        args, w = (w.to(dtype).to(DEVICE), None), w.to(dtype).float()
    y, res_out = decode_linear_after_norm(x, res, norm.weight.to(DEVICE), norm.eps, *args, b, config=(16, 64, 4, 2))
    # the unfused reference: the norm on CPU (rounded to x's dtype), then the product in float
    h, want_res = norm(x.cpu(), res.cpu()) if has_res else (norm(x.cpu()), x.cpu())
    want = h.float() @ w.T + (b.float().cpu() if bias else 0)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y.float().cpu(), want, **tol)
    assert torch.equal(res_out.cpu(), want_res)  # the residual sum is exact: one rounding, as rms_norm rounds
    # the normed input handed back too (an MoE block's experts read what its router reads)
    y2, res2, normed = decode_linear_after_norm(x, res, norm.weight.to(DEVICE), norm.eps, *args, b,
                                                config=(16, 64, 4, 2), return_normed=True)
    assert torch.equal(y2, y) and torch.equal(res2.cpu(), want_res)
    torch.testing.assert_close(normed.float().cpu(), h.float(), **(dict(atol=1e-5, rtol=1e-5) if dtype ==
                                                                   torch.float32 else TOL[dtype]))
    if has_res:
        with pytest.raises(ValueError, match="residual's shape"):
            decode_linear_after_norm(x, res[:, 1:], norm.weight.to(DEVICE), norm.eps, *args)


@pytest.mark.parametrize("rows,has_res,k", [(1, True, 96), (2, False, 96), (20, True, 96), (1, True, 4096)])
def test_apply_linear_after_norm_equals_norm_then_linear(rows, has_res, k):
    """On CUDA one row runs the one-kernel path, 2 and 20 rows and a row wider than NORM_FOLD_MAX_K the two
    kernels; on CPU all run in torch."""
    from gridserve.layers.linear import apply_linear_after_norm

    x, res = rand(rows, k, dtype=torch.float32), rand(rows, k, dtype=torch.float32) if has_res else None
    norm = RMSNorm(k, eps=1e-6).to(DEVICE)
    norm.weight.data = torch.rand(k, device=DEVICE) + 0.5
    w = rand(24, k, dtype=torch.float32)
    y, res_out, normed = apply_linear_after_norm(x, res, norm, w, return_normed=True)
    h, want_res = norm(x, res) if has_res else (norm(x), x)
    torch.testing.assert_close(y.cpu(), torch.nn.functional.linear(h, w).cpu(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res_out.cpu(), want_res.cpu(), atol=1e-6, rtol=0)
    torch.testing.assert_close(normed.cpu(), h.cpu(), atol=1e-5, rtol=1e-5)
    assert len(apply_linear_after_norm(x, res, norm, w)) == 2


@pytest.mark.parametrize("dtype", DECODE_GEMM_DTYPES)
@pytest.mark.parametrize("fp8,gated,normed", [(False, False, False), (True, True, False), (False, True, True)])
@pytest.mark.parametrize("m", [1, 5])
def test_a_norm_split_over_two_gemms_is_the_add_and_rms_norm_between_them(dtype, fp8, gated, normed, m):
    """o_proj (or down) adds the residual and writes its tiles' sums of squares, row by row; the GEMM after the norm
    sums those: together the unfused product, residual add, RMSNorm and product. 300 outputs in tiles of 16: the
    last partial. One row (the dot-product path) and five (tl.dot on 16-row tiles)."""
    from gridserve.layers.decode_gemm import decode_linear_add_residual
    from gridserve.layers.quantization import quantize_per_channel

    k_in, hidden, n = 96, 300, 40
    x, res = rand(m, 2 * k_in if gated else k_in, dtype=dtype), rand(m, hidden, dtype=dtype)
    w1 = torch.randn(hidden, k_in) / 8
    if fp8:
        q, scale = quantize_per_channel(w1)
        args1, w1 = (q.to(DEVICE), scale.to(DEVICE)), q.float() * scale[:, None]
    else:
        args1, w1 = (w1.to(dtype).to(DEVICE), None), w1.to(dtype).float()
    w2 = (torch.randn(n, hidden) / 8).to(dtype)
    norm = RMSNorm(hidden, eps=1e-5)
    norm.weight.data = (torch.rand(hidden) + 0.5).to(dtype)
    h, partials = decode_linear_add_residual(x, res, *args1, config=(16, 64, 4, 2), gated=gated)
    assert partials.shape == (m, 19) and partials.dtype == torch.float32
    y, res_out, *normed_out = decode_linear_after_norm(h, None, norm.weight.to(DEVICE), norm.eps, w2.to(DEVICE),
                                                       config=(16, 64, 4, 2), return_normed=normed,
                                                       sum_sq_partials=partials)
    # the unfused reference on CPU: the product rounded to x's dtype, then rms_norm's add and norm, then the product
    x_in = activation.silu_and_mul(x.cpu()) if gated else x.cpu()
    o = (x_in.float() @ w1.T).to(dtype)
    want_normed, want_res = norm(o, res.cpu())
    want = want_normed.float() @ w2.float().T
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(h.float().cpu(), want_res.float(), **tol)
    torch.testing.assert_close(partials.sum(1).cpu(), want_res.float().pow(2).sum(1), rtol=1e-4, atol=1e-4)
    assert res_out is h  # the sum is the residual stream
    torch.testing.assert_close(y.float().cpu(), want, **tol)
    if normed:
        torch.testing.assert_close(normed_out[0].float().cpu(), want_normed.float(), **tol)
    with pytest.raises(ValueError, match="residual's shape"):
        decode_linear_add_residual(rand(2, k_in, dtype=dtype), rand(3, hidden, dtype=dtype), *args1)
    with pytest.raises(ValueError, match="no residual"):
        decode_linear_after_norm(h, res, norm.weight.to(DEVICE), norm.eps, w2.to(DEVICE), sum_sq_partials=partials)


@pytest.mark.parametrize("dtype", DECODE_GEMM_DTYPES)
@pytest.mark.parametrize("fp8", [False, True])
def test_the_one_row_loop_with_loads_ahead_gives_the_same_bits(dtype, fp8):
    """One row's K loop pipelined (stages 3: two tiles of loads ahead) against unpipelined (stages 1), on each of its
    inputs: the plain product, the gated one, the residual add and norm before it, and the split norm's two halves.
    The same products in the same order: the same bits (the interpreter has no pipelining; on a GPU it is real)."""
    from gridserve.layers.decode_gemm import decode_linear_add_residual
    from gridserve.layers.quantization import quantize_per_channel

    k, n = 600, 300  # 600 = 4 tiles of 128 and a partial one; 300 outputs end mid-tile
    w = torch.randn(n, k) / 8
    wargs = tuple(t.to(DEVICE) for t in quantize_per_channel(w)) if fp8 else (w.to(dtype).to(DEVICE),)
    x, gx, res = rand(1, k, dtype=dtype), rand(1, 2 * k, dtype=dtype), rand(1, k, dtype=dtype)
    norm_w = (torch.rand(k) + 0.5).to(dtype).to(DEVICE)
    w2 = (torch.randn(40, n) / 8).to(dtype).to(DEVICE)
    res2 = rand(1, n, dtype=dtype)

    def run(stages):
        cfg = (8, 128, 4, stages)
        h, partials = decode_linear_add_residual(x, res2, *wargs, config=cfg)
        return (decode_linear(x, *wargs, config=cfg), decode_linear(gx, *wargs, config=cfg, gated=True),
                *decode_linear_after_norm(x, res, norm_w, 1e-5, *wargs, config=cfg, return_normed=True), h, partials,
                decode_linear_after_norm(h, None, norm_w[:n], 1e-5, w2, config=cfg, sum_sq_partials=partials)[0])

    for got, want in zip(run(3), run(1), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("rows,hidden,k_in", [(1, 4096, 64), (1, 96, 64), (3, 4096, 64), (3, 4096, 4096)])
def test_a_decoder_layer_chain_with_the_split_norm_equals_the_unfused_one(rows, hidden, k_in):
    """A row-parallel o_proj's forward_add_residual, then apply_linear_after_norm and RMSNorm on what it hands over,
    against the plain product, add and norm. On CUDA 4,096 outputs take the split (a SummedResidual) at one row, and
    at 3 rows where the decode GEMM takes o_proj (a reduction of 4,096); the others, and all on CPU, hand the
    residual on."""
    from gridserve.layers.linear import (
        NORM_FOLD_MAX_K,
        RowParallelLinear,
        apply_linear_add_residual,
        apply_linear_after_norm,
    )
    from gridserve.layers.norm import SummedResidual

    x, res = rand(rows, k_in, dtype=torch.float32), rand(rows, hidden, dtype=torch.float32)
    w1, w2 = rand(hidden, k_in, dtype=torch.float32) / 4, rand(24, hidden, dtype=torch.float32) / 8
    norm = RMSNorm(hidden, eps=1e-6).to(DEVICE)
    norm.weight.data = torch.rand(hidden, device=DEVICE) + 0.5
    o_proj = RowParallelLinear(k_in, hidden).to(DEVICE)
    o_proj.weight.data.copy_(w1)
    h, handed = o_proj.forward_add_residual(x, res)
    split = DEVICE == "cuda" and hidden > NORM_FOLD_MAX_K and (rows == 1 or k_in >= 4096)
    assert isinstance(handed, SummedResidual) == split
    if not split:
        with pytest.raises(ValueError, match="only for rows on CUDA"):
            apply_linear_add_residual(x, res, w1)
    y, res_out = apply_linear_after_norm(h, handed, norm, w2)
    final, final_res = norm(h, handed)  # the model's last norm takes the same pair
    want_normed, want_res = norm(x @ w1.T, res)
    # fp32 sums of k_in products in another order than cuBLAS's: errors grow with k_in (8e-5 at 4,096 on an H100)
    tol = 1e-5 * max(1, k_in // 256)
    torch.testing.assert_close(res_out.cpu(), want_res.cpu(), atol=tol, rtol=tol)
    torch.testing.assert_close(final_res.cpu(), want_res.cpu(), atol=tol, rtol=tol)
    torch.testing.assert_close(final.cpu(), want_normed.cpu(), atol=tol, rtol=tol)
    torch.testing.assert_close(y.cpu(), (want_normed @ w2.T).cpu(), atol=10 * tol, rtol=10 * tol)


def test_decode_gemm_tiles_fit_float32_weights():
    from gridserve.layers import decode_gemm
    from gridserve.layers.decode_gemm import DECODE_GEMM_CONFIG, ONE_ROW_CONFIG, decode_gemm_config

    bf16, f32 = torch.empty(8, 8, dtype=torch.bfloat16), torch.empty(8, 8)
    assert decode_gemm_config(1, bf16) == ONE_ROW_CONFIG and decode_gemm_config(2, bf16) == DECODE_GEMM_CONFIG
    assert decode_gemm_config(2, f32)[1] == DECODE_GEMM_CONFIG[1] // 2  # 4 stages of 32 x 512 x 4 bytes: 256 KB
    with pytest.MonkeyPatch.context() as mp:  # a shape the sweep tuned takes its own one-row tiles
        mp.setitem(decode_gemm.ONE_ROW_TILES, (8, 8, 2), (4, 512, 4, 4))
        assert decode_gemm_config(1, bf16) == (4, 512, 4, 4)
        assert decode_gemm_config(1, f32) == (8, 512, 8, 1)  # another dtype: the default, K tile halved
        mp.setitem(decode_gemm.FEW_ROWS_TILES, (8, 8, 2), (64, 256, 4, 3))  # and its own tiles at 2-16 rows
        assert decode_gemm_config(2, bf16) == decode_gemm_config(16, bf16) == (64, 256, 4, 3)
        assert decode_gemm_config(1, bf16) == (4, 512, 4, 4) and decode_gemm_config(2, f32) != (64, 256, 4, 3)
    # the default tiles (no config) on widths that are no multiple of them, on both paths
    for m in (1, 3):
        x, w = rand(m, 600, dtype=torch.float32), rand(100, 600, dtype=torch.float32)
        torch.testing.assert_close(decode_linear(x, w), x @ w.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m,key,config", [(4, *item) for item in sorted(FEW_ROWS_TILES.items())]
                         + [(1, *item) for item in sorted(ONE_ROW_TILES.items())])
def test_tuned_tiles_finish_the_split_norm(m, key, config):
    """Each tile setting of FEW_ROWS_TILES (at 4 rows) and ONE_ROW_TILES (at 1), tuned on real shapes, as the model
    runs it: the GEMM after a split RMSNorm, on a weight of the entry's width in bytes (1: FP8) that is no multiple of
    the tiles, against the plain add, norm and product, the normed input handed on too (as MoE's router does). On the
    GPU in bf16: the tiles' stages fit shared memory only at the widths tuned."""
    from gridserve.layers.decode_gemm import decode_linear_add_residual
    from gridserve.layers.quantization import quantize_per_channel

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    x, res = rand(m, 96, dtype=dtype), rand(m, 300, dtype=dtype)
    w1, w2 = rand(300, 96, dtype=dtype) / 8, torch.randn(100, 300) / 8
    if key[2] == 1:
        q, scale = quantize_per_channel(w2)
        args, w2 = (q.to(DEVICE), scale.to(DEVICE)), q.float() * scale[:, None]
    else:
        args, w2 = (w2.to(dtype).to(DEVICE), None), w2.to(dtype).float()
    norm = RMSNorm(300, eps=1e-5)
    norm.weight.data = (torch.rand(300) + 0.5).to(dtype)
    h, partials = decode_linear_add_residual(x, res, w1, config=(16, 64, 4, 2))
    y, _, normed = decode_linear_after_norm(h, None, norm.weight.to(DEVICE), norm.eps, *args, config=config,
                                            return_normed=True, sum_sq_partials=partials)
    want_normed, _ = norm((x.float() @ w1.float().T).to(dtype).cpu(), res.cpu())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(y.float().cpu(), want_normed.float() @ w2.T, **tol)
    torch.testing.assert_close(normed.float().cpu(), want_normed.float(), **tol)


@pytest.mark.parametrize("dtype", DECODE_GEMM_DTYPES)
@pytest.mark.parametrize("m", [2, 9, 16])
def test_the_few_rows_product_transposed_gives_the_same_results(dtype, m, monkeypatch):
    """FEW_ROWS_SWAP (tl.dot on W x^T): the plain product with an FP8 weight and a bias, the norm folded in with the
    normed input handed on, and the split norm's first half (the residual added, the partial sums), each against
    the same call the other way round."""
    from gridserve.layers import decode_gemm
    from gridserve.layers.quantization import quantize_per_channel

    n, k = 72, 300  # k ends mid-block
    x, res, nw = rand(m, k, dtype=dtype), rand(m, k, dtype=dtype), (torch.rand(k) + 0.5).to(dtype).to(DEVICE)
    q, scale = quantize_per_channel(torch.randn(n, k) / 8)
    w, b, res_n = rand(n, k, dtype=dtype), rand(n, dtype=dtype), rand(m, n, dtype=dtype)
    calls = [
        lambda: (decode_linear(x, q.to(DEVICE), scale.to(DEVICE), b, config=(32, 64, 4, 2)),),
        lambda: decode_linear_after_norm(x, res, nw, 1e-6, w, None, b, config=(16, 128, 4, 2), return_normed=True),
        lambda: decode_gemm.decode_linear_add_residual(x, res_n, w, config=(64, 64, 4, 2)),
    ]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
    for call in calls:
        monkeypatch.setattr(decode_gemm, "FEW_ROWS_SWAP", False)
        want = call()
        monkeypatch.setattr(decode_gemm, "FEW_ROWS_SWAP", True)
        got = call()
        for g, w_ in zip(got, want, strict=True):
            torch.testing.assert_close(g.float().cpu(), w_.float().cpu(), **tol)
