"""Long prompts' attention through a fused SDPA kernel (attention/long_extend.py): the merge kernel, one request's
two-part attention, and the Triton backend splitting a batch between that path and its own kernel. On this CPU the
fused kernel is PyTorch's CPU flash kernel and the Triton kernels run under TRITON_INTERPRET=1; with
TRITON_INTERPRET=0 on a GPU (scripts/device_speed.sh) the same tests run cuDNN's kernel in bfloat16."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gridserve.attention.long_extend import LONG_EXTEND_FROM, attend_long, exact_plan  # noqa: E402
from gridserve.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from gridserve.attention.triton_ops.merge_states import merge_states  # noqa: E402
from gridserve.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from gridserve.layers.attention import Attention  # noqa: E402
from gridserve.mem_cache.memory_pool import KVCache  # noqa: E402
from tests.paged_kv import extend_reference, make_extend_case  # noqa: E402

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"
# cuDNN's kernel takes half precision only
DTYPE, ATOL = (torch.bfloat16, 2e-2) if DEVICE == "cuda" else (torch.float32, 1e-4)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_merge_states_matches_softmax_over_both_parts(dtype, atol):
    """Two parts' outputs and log-sum-exps, from strided (1, H, T, D)-style views, merge into the attention over
    all the keys; 21 tokens cross the kernel's 16-token blocks; head_dim 80 is masked to 128."""
    g = torch.Generator().manual_seed(0)
    heads, tokens, d, keys1, keys2 = 3, 21, 80, 9, 14
    q = torch.randn(heads, tokens, d, generator=g)
    k = torch.randn(heads, keys1 + keys2, d, generator=g)
    v = torch.randn(heads, keys1 + keys2, d, generator=g)
    s = torch.einsum("htd,hkd->htk", q, k) * 0.1
    want = torch.einsum("htk,hkd->thd", torch.softmax(s, -1), v)

    def part(sl):
        return torch.einsum("htk,hkd->htd", torch.softmax(s[..., sl], -1), v[:, sl]), torch.logsumexp(s[..., sl], -1)

    (o1, lse1), (o2, lse2) = part(slice(0, keys1)), part(slice(keys1, None))
    o1, lse1, o2, lse2 = (t.to(DEVICE) for t in (o1, lse1, o2, lse2))
    out = torch.full((tokens, heads, d), float("nan"), dtype=dtype, device=DEVICE)
    res = merge_states(o1.to(dtype).transpose(0, 1), lse1, o2.to(dtype).transpose(0, 1), lse2, out)
    assert res is out
    torch.testing.assert_close(out.float().cpu(), want, atol=atol, rtol=atol)


def test_merge_states_rejects_mismatched_shapes():
    o = torch.zeros(4, 2, 16)
    with pytest.raises(ValueError, match="lse must be"):
        merge_states(o, torch.zeros(4, 2), o, torch.zeros(2, 4), o.clone())
    with pytest.raises(ValueError, match="last dimension contiguous"):
        merge_states(o.transpose(0, 2).contiguous().transpose(0, 2), torch.zeros(2, 4), o, torch.zeros(2, 4), o)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("prefix,new", [(0, 37), (45, 20), (3, 50)])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_one_request_over_its_prefix_and_itself(prefix, new, dtype, atol, exact):
    """Scattered slots, poisoned unused ones (NaN would leak into any softmax they reached), GQA 8 heads over 2;
    q in either order (exact: (heads, tokens, D), which on a GPU takes cuDNN's exact-shape plans)."""
    if DEVICE == "cuda" and dtype == torch.float32:
        pytest.skip("cuDNN's kernel takes half precision only")
    q, k, v, r2t, rpi, sl, el, esl = make_extend_case([prefix], [new], 8, 2, 64, dtype, seed=prefix, device=DEVICE)
    slots = r2t[rpi[0], : prefix + new].long()
    out = torch.full_like(q, float("nan"))
    attend_long(q, k, v, slots, 0.125, out, exact)
    torch.testing.assert_close(out.float().cpu(), extend_reference(q, k, v, r2t, rpi, sl, el, esl, 0.125), atol=atol,
                               rtol=atol)


def _batch(prefix_lens, ext_lens, seed):
    """A real KV cache and ForwardBatch holding make_extend_case's requests (one layer)."""
    q, k, v, r2t, rpi, sl, el, esl = make_extend_case(prefix_lens, ext_lens, 8, 2, 64, DTYPE, seed=seed,
                                                      poison=1e30, device=DEVICE)
    kv = KVCache(k.shape[0] - 1, 1, 2, 64, DTYPE, DEVICE)
    kv.k_buffers[0].copy_(k)
    kv.v_buffers[0].copy_(v)
    n = sum(ext_lens)
    zeros = torch.zeros(n, dtype=torch.long, device=DEVICE)
    fb = ForwardBatch(forward_mode=ForwardMode.EXTEND, batch_size=len(ext_lens), input_ids=zeros, positions=zeros,
                      req_pool_indices=rpi, seq_lens=sl,
                      out_cache_loc=zeros, seq_lens_cpu=sl.tolist(),
                      extend_seq_lens_cpu=list(ext_lens), req_to_token=r2t, kv_cache=kv)
    want = extend_reference(q, k, v, r2t, rpi, sl, el, esl, 0.125)
    return q.reshape(n, -1), fb, want


@pytest.mark.parametrize("given_out", [False, True])
def test_backend_splits_a_batch_between_the_long_path_and_its_kernel(given_out):
    """Two long requests (one after a prefix) through the fused path, two short ones through the Triton kernel in
    one launch with the long ones' lengths zeroed; the same answer as the reference for every row."""
    q, fb, want = _batch([30, 0, 5, 0], [40, 3, 1, 33], seed=7)
    backend = TritonAttentionBackend()
    assert backend.long_extend_from == 0  # off unless asked for
    backend.long_extend_from = 32
    backend.init_forward_metadata(fb)
    assert [(start, n, exact) for start, n, _, exact in backend.long] == [(0, 40, False), (44, 33, False)]
    assert backend.long[0][2].tolist() == fb.req_to_token[fb.req_pool_indices[0], :70].tolist()
    assert backend.rest_max == 3 and backend.rest_lens.tolist() == [0, 3, 1, 0]
    layer = Attention(8, 64, 2, layer_id=0, scaling=0.125)
    out = torch.full_like(q, float("nan")) if given_out else None
    res = backend.extend_attend(q, layer, fb, out=out)
    assert out is None or res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(res.view(-1, 8, 64).float().cpu(), want, atol=ATOL, rtol=ATOL)


def test_a_batch_of_long_requests_only_and_the_fallback_when_the_fused_kernel_fails(monkeypatch):
    """All requests long: no Triton launch for the rest. A fused kernel that raises (a build without it): the
    batch still gets the right answer, from the Triton kernel, and the path stays off from then on."""
    q, fb, want = _batch([0, 12], [40, 36], seed=8)
    backend = TritonAttentionBackend(whole_chunk=40)
    backend.long_extend_from = 32
    backend.init_forward_metadata(fb)
    assert backend.rest_max == 0 and backend.rest_lens is None
    assert [exact for *_, exact in backend.long] == [True, False]  # a whole chunk from the start; 36 after 12
    layer = Attention(8, 64, 2, layer_id=0, scaling=0.125)
    torch.testing.assert_close(backend.extend_attend(q, layer, fb).view(-1, 8, 64).float().cpu(), want, atol=ATOL,
                               rtol=ATOL)

    def refuse(*args, **kwargs):
        raise RuntimeError("cuDNN Frontend error: No valid execution plans built")

    monkeypatch.setattr("gridserve.attention.triton_backend.attend_long", refuse)
    torch.testing.assert_close(backend.extend_attend(q, layer, fb).view(-1, 8, 64).float().cpu(), want, atol=ATOL,
                               rtol=ATOL)
    assert backend.long_extend_from == 0 and backend.long == []


def test_exact_plans_for_whole_chunks_after_whole_chunks_only():
    """The shapes every long prompt repeats take exact plans; a last chunk, a chunk after a cached prefix of any
    other length, and everything when the budget is unknown (0) stay ragged."""
    assert [exact_plan(8192, p, 8192) for p in (0, 8192, 16384, 24576)] == [True] * 4
    assert not exact_plan(7424, 24576, 8192)  # a 32,000-token prompt's last chunk
    assert not exact_plan(8192, 5000, 8192)  # after a radix-cache hit of 5,000 tokens
    assert not exact_plan(4096, 0, 8192) and not exact_plan(8192, 0, 0)


def test_ragged_plans_switch_keeps_a_users_own_setting(monkeypatch):
    from gridserve.attention.long_extend import use_ragged_plans

    monkeypatch.delenv("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", raising=False)
    use_ragged_plans()
    assert os.environ["TORCH_CUDNN_SDPA_AVOID_RECOMPILE"] == "1"
    monkeypatch.setenv("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "0")
    use_ragged_plans()
    assert os.environ["TORCH_CUDNN_SDPA_AVOID_RECOMPILE"] == "0"


def test_cpu_backends_never_take_the_cudnn_path_and_count_no_prefix_memory():
    from gridserve.attention.registry import make_attention_backend

    backend = make_attention_backend("triton", torch.device("cpu"), cudnn_long_prefill=True)
    assert backend.long_extend_from == 0
    assert backend.long_prefix_bytes(32768, 8192, 32, 8, 128, torch.bfloat16) == 0
    backend.long_extend_from = LONG_EXTEND_FROM
    # the 8B's 32k context: K and V copied (128 MiB) and the prefix part's output (64 MiB) and log-sum-exps
    assert backend.long_prefix_bytes(32768, 8192, 32, 8, 128, torch.bfloat16) == (128 + 64 + 2) << 20


@pytest.mark.skipif(DEVICE == "cuda", reason="the float32 script runs on CPU, where the Triton kernels interpret")
@pytest.mark.parametrize("piecewise", [False, True])
def test_a_tiny_model_through_the_long_path_gives_the_torch_backends_logits(piecewise, tmp_path, monkeypatch):
    """The whole model (prefill, a prefix extend, decode) with the threshold lowered so that the script's 11- and
    23-token prompts and its 13-token extend take the fused path (the 11 as a whole chunk); through the piecewise
    runner too (eager pieces, attention writing into its static buffer)."""
    from gridserve.model_executor.piecewise_graph_runner import PiecewiseGraphRunner
    from tests.logits_script import make_runner, run_script
    from tests.tiny_models import make_tiny_model

    make_tiny_model("qwen3", tmp_path)
    want = run_script(make_runner(str(tmp_path)))
    runner = make_runner(str(tmp_path), attention_backend="triton")
    runner.attn_backend.long_extend_from = 8
    runner.attn_backend.whole_chunk = 11  # the 11-token prompt takes the exact-plan order of q
    calls = []

    def recorded(q, *args):
        calls.append((q.shape[0], args[-1]))
        return attend_long(q, *args)

    monkeypatch.setattr("gridserve.attention.triton_backend.attend_long", recorded)
    if piecewise:
        runner.prefill_graphs = PiecewiseGraphRunner(runner, 64, capture=False)
    got = run_script(runner)
    # the last extend: 7, 3 and 13 new tokens, the 13 after a prefix
    assert [(n, exact) for _, n, _, exact in runner.attn_backend.long] == [(13, False)]
    assert set(calls) == {(11, True), (23, False), (13, False)}  # each of the model's layers called alike
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
