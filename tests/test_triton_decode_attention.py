"""Triton paged decode attention vs a plain-PyTorch reference (runs on CPU under TRITON_INTERPRET=1)."""

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gridserve.attention.triton_ops import DecodeWorkspace, decode_attention  # noqa: E402
from tests.paged_kv import make_paged_kv  # noqa: E402

# the module (the package's name decode_attention is the function)
decode_module = importlib.import_module("gridserve.attention.triton_ops.decode_attention")
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"


def reference(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, scale):
    bs, num_heads, _ = q.shape
    group = num_heads // k_buf.shape[1]
    out = torch.empty(bs, num_heads, v_buf.shape[2], dtype=torch.float32)
    for i in range(bs):
        slots = req_to_token[req_pool_indices[i], : seq_lens[i]].long().cpu()
        k = k_buf.cpu()[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)  # (H, L, D)
        v = v_buf.cpu()[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        s = torch.einsum("hd,hld->hl", q[i].cpu().float(), k) * scale
        out[i] = torch.einsum("hl,hld->hd", torch.softmax(s, dim=-1), v)
    return out


def make_case(lens, num_heads, num_kv_heads, head_dim, dtype, seed=0, poison=float("nan"), head_dim_v=None):
    g, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens = make_paged_kv(
        lens, num_kv_heads, head_dim, dtype, seed, poison, head_dim_v)
    q = torch.randn(len(lens), num_heads, head_dim, generator=g).to(dtype)
    to = lambda t: t.to(DEVICE)
    return to(q), to(k_buf), to(v_buf), to(req_to_token), to(req_pool_indices), to(seq_lens)


SHAPES = [
    # (lens, num_heads, num_kv_heads, head_dim)
    ([1], 4, 4, 64),
    ([1, 5, 77], 8, 2, 64),
    ([33, 1, 100, 7, 64], 8, 1, 128),
    ([50, 1, 9], 4, 4, 80),
    ([2, 70, 1], 8, 8, 128),
    ([3, 40], 6, 2, 64),  # a group of 3: the one-kernel merge pads it to 4 heads
]


# merge_in_stage1 True: one kernel (the default); False: the two-stage path, in fp32 only to keep the suite short
PATHS = [(torch.float32, 1e-4, True), (torch.bfloat16, 2e-2, True), (torch.float32, 1e-4, False)]


@pytest.mark.parametrize("dtype,atol,merge_in_stage1", PATHS)
@pytest.mark.parametrize("lens,num_heads,num_kv_heads,head_dim", SHAPES)
def test_matches_reference(lens, num_heads, num_kv_heads, head_dim, dtype, atol, merge_in_stage1):
    q, k, v, r2t, rpi, sl = make_case(lens, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = torch.full((len(lens), num_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    res = decode_attention(q, k, v, r2t, rpi, sl, scale, num_kv_splits=4, out=out, merge_in_stage1=merge_in_stage1)
    assert res is out and res.dtype == dtype
    assert torch.isfinite(out).all(), "output not fully written or poisoned KV leaked"
    ref = reference(q, k, v, r2t, rpi, sl, scale)
    torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=atol)


def test_small_batches_of_a_half_precision_cache_take_long_blocks_and_still_match():
    """default_launch: up to SMALL_BATCH requests of a 2-byte cache, with groups of SMALL_BATCH_GROUP query heads or
    more, run 128-key blocks over 1 stage (faster in the models on an H100); larger batches, smaller groups and
    float32 LAUNCH. The long blocks over contexts of several blocks, a partial one, and fewer keys than a block:
    the reference's output, with the splits merged."""
    m = decode_module
    group = m.SMALL_BATCH_GROUP
    assert m.default_launch(m.SMALL_BATCH, group, torch.bfloat16) == m.SMALL_BATCH_LAUNCH == (128, 1)
    assert m.default_launch(m.SMALL_BATCH + 1, group, torch.bfloat16) == m.LAUNCH
    assert m.default_launch(1, group // 2, torch.bfloat16) == m.LAUNCH
    assert m.default_launch(1, group, torch.float32) == m.LAUNCH
    q, k, v, r2t, rpi, sl = make_case([300, 3, 129], 8, 2, 64, torch.bfloat16, seed=3)  # a group of 4
    for splits in (1, 4):
        out = decode_attention(q, k, v, r2t, rpi, sl, 0.125, num_kv_splits=splits)
        torch.testing.assert_close(out.float().cpu(), reference(q, k, v, r2t, rpi, sl, 0.125), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("merge_in_stage1", [True, False])
@pytest.mark.parametrize("num_kv_splits", [1, 3, 16])
def test_split_counts_and_huge_poison(num_kv_splits, merge_in_stage1):
    # more splits than keys for short requests (empty splits), a split count that is not a power of two
    lens = [1, 3, 40]
    q, k, v, r2t, rpi, sl = make_case(lens, 8, 2, 64, torch.float32, seed=1, poison=1e30)
    out = decode_attention(q, k, v, r2t, rpi, sl, 0.125, num_kv_splits=num_kv_splits, block_n=16,
                           merge_in_stage1=merge_in_stage1)
    ref = reference(q, k, v, r2t, rpi, sl, 0.125)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("merge_in_stage1", [True, False])
def test_a_long_grid_splits_only_long_contexts_finely(merge_in_stage1):
    """64 splits in the grid: a context of up to 16 x MIN_SPLIT_LEN keys still uses at most 16, none shorter than a
    block (so 300 keys take 5 splits of 64, 3 keys one), a longer one splits of MIN_SPLIT_LEN (19 for 4,796 keys)
    up to all 64; the unused splits' programs leave without writing to the workspace (nor does the one kernel's only
    split, which writes the output itself). A workspace for 4 requests x 16 splits holds 1 request x 64."""
    from gridserve.attention.triton_ops.decode_attention import MIN_SPLIT_LEN

    lens = [3, 300, 16 * MIN_SPLIT_LEN + 700, 64 * MIN_SPLIT_LEN + 100]
    q, k, v, r2t, rpi, sl = make_case(lens, 4, 2, 32, torch.float32, seed=5)
    ws = DecodeWorkspace.allocate(max_bs=4, num_heads=4, head_dim_v=32, device=DEVICE)
    assert ws.max_splits(1) == 64 and ws.max_splits(3) == 21
    for i, want_used in enumerate([1, 5, 19, 64]):  # one request at a time, as batch 1 runs
        ws.attn_out.fill_(float("nan"))
        ws.attn_lse.fill_(float("nan"))
        one = slice(i, i + 1)
        out = decode_attention(q[one], k, v, r2t, rpi[one], sl[one], 0.125, num_kv_splits=64, workspace=ws,
                               block_n=64, merge_in_stage1=merge_in_stage1)
        torch.testing.assert_close(out.cpu(), reference(q[one], k, v, r2t, rpi[one], sl[one], 0.125),
                                   atol=1e-4, rtol=1e-4)
        assert not ws.counters.any()
        lse = ws.views(1, 64)[1][0]
        written = 0 if merge_in_stage1 and want_used == 1 else want_used
        assert torch.isfinite(lse[:, :written]).all() and lse[:, written:].isnan().all(), lens[i]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_contexts_up_to_solo_len_attend_in_one_program(dtype, atol):
    """solo_len 100: requests of up to 100 keys (and an empty row) are one split, whose program writes the output
    and nothing to the workspace; longer ones split and merge as before, in the same call. The two-stage path
    takes the same splits and merges them in its second kernel."""
    lens = [0, 1, 64, 100, 101, 300]
    q, k, v, r2t, rpi, sl = make_case([max(n, 1) for n in lens], 8, 2, 64, dtype, seed=7)
    sl = torch.tensor(lens, device=DEVICE)
    ref = reference(q, k, v, r2t, rpi, sl, 0.125)
    ref[0] = 0.0
    for merge in (True, False):
        ws = DecodeWorkspace.allocate(max_bs=6, num_heads=8, head_dim_v=64, device=DEVICE, num_kv_heads=2)
        ws.attn_out.fill_(float("nan"))
        ws.attn_lse.fill_(float("nan"))
        out = decode_attention(q, k, v, r2t, rpi, sl, 0.125, num_kv_splits=4, workspace=ws, block_n=16,
                               merge_in_stage1=merge, solo_len=100)
        torch.testing.assert_close(out.float().cpu(), ref, atol=atol, rtol=atol)
        assert not ws.counters.any()
        lse = ws.views(6, 4)[1]  # (request, head, split)
        used = [1, 1, 1, 1, 4, 4]  # 101 keys: 4 splits of 26 (no split shorter than block_n 16 keys)
        for i, n in enumerate(used):
            written = 0 if merge and n == 1 else n
            # (an empty row's one split writes an LSE of -inf for the second kernel)
            assert not lse[i, :, :written].isnan().any() and lse[i, :, written:].isnan().all(), (merge, lens[i])


def test_fp16_and_workspace_reuse():
    ws = DecodeWorkspace.allocate(max_bs=4, num_heads=8, head_dim_v=64, num_kv_splits=4, device=DEVICE)
    for seed, lens in enumerate([[5, 45], [1, 2, 3, 60]]):
        q, k, v, r2t, rpi, sl = make_case(lens, 8, 4, 64, torch.float16, seed=seed)
        ws.attn_out.fill_(float("nan"))
        ws.attn_lse.fill_(float("nan"))
        out = decode_attention(q, k, v, r2t, rpi, sl, 0.125, workspace=ws)
        assert not ws.counters.any()
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float().cpu(), reference(q, k, v, r2t, rpi, sl, 0.125), atol=2e-2, rtol=2e-2)


def test_a_larger_eager_batch_never_frees_the_workspace_the_graphs_captured():
    """Batches above --cuda-graph-max-bs run eagerly and need a larger workspace. The one the CUDA graphs captured
    must stay allocated: replays write to its addresses (freed, its memory went to other tensors, and the 1,024-prompt
    offline run hit an illegal memory access once the batch fell back under 256)."""
    import gc
    import weakref

    from gridserve.attention.triton_backend import TritonAttentionBackend

    backend = TritonAttentionBackend()
    backend.init_cuda_graph_state(4, 8, 64, torch.device(DEVICE))
    captured = weakref.ref(backend.workspace.attn_out)
    grown = weakref.ref(backend._workspace_for(300, 8, 64, torch.device(DEVICE)).attn_out)  # an eager batch of 300
    assert backend.workspace.max_bs >= 300
    backend._workspace_for(1000, 8, 64, torch.device(DEVICE))  # and a larger one
    gc.collect()
    assert captured() is not None  # the graphs' workspace stays
    assert grown() is None  # one only an eager batch used goes
    assert backend._workspace_for(7, 8, 64, torch.device(DEVICE)).max_bs >= 1000  # smaller batches use the largest


@pytest.mark.parametrize("merge_in_stage1", [True, False])
def test_value_head_dim_differs_and_zero_length_row(merge_in_stage1):
    # head_dim_v != head_dim; a seq_len 0 row (padded CUDA-graph batch) gives zeros, not NaN
    q, k, v, r2t, rpi, sl = make_case([4, 20], 4, 2, 32, torch.float32, seed=3, head_dim_v=48)
    sl = sl.clone()
    sl[0] = 0
    out = decode_attention(q, k, v, r2t, rpi, sl, 0.2, num_kv_splits=2, merge_in_stage1=merge_in_stage1)
    assert out.shape == (2, 4, 48)
    assert torch.equal(out[0].cpu(), torch.zeros(4, 48))
    torch.testing.assert_close(out[1:].cpu(), reference(q[1:], k, v, r2t, rpi[1:], sl[1:], 0.2), atol=1e-4, rtol=1e-4)


def test_one_kernel_calls_in_a_row_share_the_workspace(monkeypatch):
    """The one-kernel path called again and again on one workspace, as the layers of a decode step and CUDA-graph
    replays do: batches of 1 to 4, seq_len 0 rows, up to 64 splits, GQA group 4, head_dim 128. Each result is
    right and every arrival counter is back at zero after each call. A MIN_SPLIT_LEN of 4 lets contexts of a few
    hundred keys use most of a long grid's 64 splits (with the real 256 that takes 16K keys: slow here)."""
    monkeypatch.setattr(decode_module, "MIN_SPLIT_LEN", 4)
    ws = DecodeWorkspace.allocate(max_bs=4, num_heads=8, head_dim_v=128, device=DEVICE, num_kv_heads=2)
    assert ws.counters.dtype == torch.int32 and ws.counters.numel() == 8 and not ws.counters.any()
    calls = [  # (lens, splits, dtype, merge_in_stage1)
        ([256], 64, torch.float32, True),  # 64 non-empty splits of 4 keys
        ([0, 37, 5], 21, torch.bfloat16, True),  # a split count that is not a power of two
        ([3, 0, 150, 1], 16, torch.float32, True),
        ([0, 90], 8, torch.float32, False),  # the two-stage path on the same workspace in between
        ([150, 0], 32, torch.bfloat16, True),
    ]
    for seed, (lens, splits, dtype, merge) in enumerate(calls):
        q, k, v, r2t, rpi, sl = make_case(lens, 8, 2, 128, dtype, seed=seed)
        ws.attn_out.fill_(float("nan"))  # nothing stale is read
        ws.attn_lse.fill_(float("nan"))
        out = decode_attention(q, k, v, r2t, rpi, sl, 128**-0.5, num_kv_splits=splits, workspace=ws,
                               merge_in_stage1=merge)
        assert not ws.counters.any(), f"call {seed}: counters {ws.counters.tolist()}"
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        ref = reference(q, k, v, r2t, rpi, sl, 128**-0.5)
        ref[sl.cpu() == 0] = 0.0
        torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
        assert torch.equal(out[sl == 0].float().cpu(), torch.zeros_like(ref[sl.cpu() == 0]))

    # a workspace with counters for fewer KV heads serves only the two-stage path
    small = DecodeWorkspace.allocate(max_bs=1, num_heads=8, head_dim_v=128, device=DEVICE, num_kv_heads=1)
    with pytest.raises(ValueError, match="too small"):
        decode_attention(q, k, v, r2t, rpi, sl, 0.1, num_kv_splits=4, workspace=small)


@pytest.mark.parametrize("kind", ["llama", "qwen3-yarn"])
def test_triton_backend_model_logits_equal_torch_backend(kind, tmp_path):
    """The whole model through --attention-backend triton (decode in Triton) equals the torch backend."""
    from tests.logits_script import make_runner, run_script
    from tests.tiny_models import make_tiny_model

    make_tiny_model(kind, tmp_path)
    want = run_script(make_runner(str(tmp_path), device=DEVICE))
    got = run_script(make_runner(str(tmp_path), attention_backend="triton", device=DEVICE))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prep_in_the_kernel_equals_the_rotary_kernel_then_attention(qk_norm, dtype, atol):
    """DecodePrep: q and the new token's k/v arrive raw; the kernel norms and rotates them and stores the new K/V.
    Against the separate path (the rotary or q/k norm + rotary kernel with its KV store, then the kernel): the
    same output and the same cache, with splits that do and do not hold the newest key, a GQA group of 4, and a
    seq_len 0 row (a padded CUDA-graph row: it stores nothing)."""
    from gridserve.attention.triton_ops.decode_attention import DecodePrep
    from gridserve.layers.fused_ops import qk_norm_rope_, rotary_embedding_

    lens, hq, hk, d = [9, 0, 70, 1], 8, 2, 64
    q, k_buf, v_buf, r2t, rpi, sl = make_case([max(n, 1) for n in lens], hq, hk, d, dtype, seed=5)
    sl = torch.tensor(lens, device=DEVICE)
    g = torch.Generator().manual_seed(6)
    k_new, v_new = (torch.randn(len(lens), hk, d, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    loc = torch.stack([r2t[rpi[i], max(n, 1) - 1] for i, n in enumerate(lens)]).long()
    positions = (sl - 1).clamp(min=0)
    inv_freq = (1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(DEVICE)
    w_q, w_k = (torch.rand(d, generator=g).to(dtype).to(DEVICE) + 0.5 for _ in range(2))
    norm = {"q_weight": w_q, "k_weight": w_k, "eps": 1e-6} if qk_norm else {}

    def separate():
        kc, vc = k_buf.clone(), v_buf.clone()
        qr, kr = q.clone(), k_new.clone()
        live = sl > 0  # a padded row's K/V goes nowhere the test reads: keep the caches comparable
        cache = (kc, vc, loc[live], v_new[live].reshape(-1, hk * d))
        if qk_norm:
            qk_norm_rope_(positions[live], qr[live], kr[live], w_q, w_k, 1e-6, inv_freq, 1.0, cache)
            qr[live] = qk_norm_rope_(positions[live], q[live].clone(), k_new[live].clone(), w_q, w_k, 1e-6, inv_freq,
                                     1.0)[0]
        else:
            qr[live] = rotary_embedding_(positions[live], q[live].clone(), kr[live], inv_freq, 1.0, cache)[0]
        return decode_attention(qr, kc, vc, r2t, rpi, sl, d**-0.5, num_kv_splits=4), kc, vc

    want, kc_want, vc_want = separate()
    kc, vc = k_buf.clone(), v_buf.clone()
    prep = DecodePrep(k_new, v_new.reshape(len(lens), hk * d), loc, positions, inv_freq, **norm)
    got = decode_attention(q.clone(), kc, vc, r2t, rpi, sl, d**-0.5, num_kv_splits=4, prep=prep)
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=atol, rtol=atol)
    assert torch.equal(got[1].cpu(), torch.zeros(hq, d, dtype=dtype))
    live = loc[sl > 0].cpu()
    torch.testing.assert_close(kc.cpu()[live].float(), kc_want.cpu()[live].float(), atol=atol, rtol=atol)
    assert torch.equal(vc.cpu()[live], v_new.cpu()[(sl > 0).cpu()])
    others = torch.ones(kc.shape[0], dtype=torch.bool)
    others[live] = False
    assert torch.equal(kc.cpu()[others].nan_to_num(7.0), k_buf.cpu()[others].nan_to_num(7.0))  # nothing else written
