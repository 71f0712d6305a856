"""A long prompt's chunks through cuDNN's fused attention (Hopper and newer), for the Triton backend.

A request's chunk of L new tokens after P cached ones attends to its P + L keys, with the causal mask aligned to the
last key. The fused kernels align it to the first, so the chunk runs as two calls, over its own L keys (causal,
square) and over the P prefix keys (no mask), which `merge_states` joins by their log-sum-exp. The request's K/V are
first gathered from the paged cache into one contiguous copy: 0.03-0.1 ms for 8-32k keys of the 8B shape on an
H100, against 1-7 ms for the attention.

cuDNN builds an execution plan for each new shape: 55-130 ms on an H100, 0.7-1.4 s for the first ones in a process.
A long prompt's last chunk has a new length nearly every time, so the exact-shape plans would cost a new-length
request more than the kernel saves. PyTorch's TORCH_CUDNN_SDPA_AVOID_RECOMPILE runs cuDNN's ragged path instead,
whose plans are keyed by lengths rounded up to powers of two (a handful per process); it needs q, k, v in (tokens,
heads, D) memory order, which is why q is made contiguous here. `use_ragged_plans` sets it when the backend turns
this path on, before the process's first cuDNN attention call reads it (PyTorch reads it once; a user's own setting
stays). The ragged path costs 8-10% of the kernel's speed, so the shapes that recur take exact plans after all: a
whole chunk of a long prompt after a prefix of whole chunks (`exact_plan`), one causal square and one prefix length
a chunk (4 plans for a 32k context in 8k chunks), built at their first use. PyTorch takes the exact plan for a call
whose q is in (heads, tokens, D) order (and logs once, from C++, that the ragged switch is "falling back to
regular dense case": expected). Measured on an H100 (`device_speed.sh exactchunks`): a 32k prompt's TTFT
1,265 -> 1,239 ms.

Measured on an H100 (`scripts/bench_extend_sdpa.py`: the 8B shape, a 32k prompt's four 8k chunks; the gather, both
calls and the merge): the ragged path 1.05 / 2.83 / 4.62 / 6.24 ms (525-617 TFLOP/s), exact-shape plans 0.95 / 2.59
/ 4.19 / 5.77, the Triton kernel 1.59 / 4.24 / 7.08 / 9.83 (346-392). Off the GPU the same steps run on PyTorch's
CPU flash kernel, which is how the tests check the gathering, the split and the merge.
"""

from __future__ import annotations

import os

import torch

LONG_EXTEND_FROM = 2048  # new tokens of one request from which its attention goes through this path


def cudnn_usable(device: torch.device) -> bool:
    """cuDNN's fused attention is there and was measured faster than the Triton kernel (compute capability 9+)."""
    return (device.type == "cuda" and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(device) >= (9, 0))


def use_ragged_plans() -> None:
    """cuDNN's ragged path for the rest of the process: plans by power-of-two lengths, not one per new shape."""
    os.environ.setdefault("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "1")


def exact_plan(new_tokens: int, prefix: int, whole_chunk: int) -> bool:
    """Whether a long request's attention takes cuDNN's exact-shape plans: a whole chunk (whole_chunk new tokens,
    the prefill budget; 0: never) after a prefix of whole chunks, a shape that every long prompt repeats. Any other
    length (a prompt's last chunk, a chunk after a cached prefix) stays on the ragged path."""
    return whole_chunk > 0 and new_tokens == whole_chunk and prefix % whole_chunk == 0


def supports(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> bool:
    """What cuDNN's kernel takes: half precision, the cache in q's dtype, one head size for K and V (<= 128)."""
    same = k_buf.dtype == q.dtype and k_buf.shape[-1] == v_buf.shape[-1] == q.shape[-1]
    if not q.is_cuda:
        return same
    return same and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """One fused call on (1, heads, tokens, D) views (k and v may have fewer heads: GQA). Returns the output as a
    (tokens, heads, D) view and the log-sum-exp as (heads, tokens) float32."""
    if q.is_cuda:
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    else:  # PyTorch's CPU flash kernel takes no GQA
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        r = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return r[0][0].transpose(0, 1), r[1].reshape(q.shape[1], q.shape[2])  # cuDNN's lse is (1, H, L, 1)


def attend_long(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor, scale: float,
                out: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """One request's new tokens q (L, H, D) over its KV slots (P + L of them, int64; the new tokens' last, already
    stored) in the paged k_buf/v_buf (slots, KV heads, D); causal. Writes (L, H, D) into out and returns it.
    exact: cuDNN's exact-shape plans for both calls (see exact_plan), else the ragged path's."""
    from gridserve.attention.triton_ops.merge_states import merge_states

    n = q.shape[0]
    prefix = slots.shape[0] - n
    if exact:  # (heads, tokens, D) order: PyTorch skips the ragged path for this call
        qh = q.transpose(0, 1).contiguous().unsqueeze(0)
    else:  # (tokens, heads, D) order: the ragged path's condition
        qh = q.contiguous().unsqueeze(0).transpose(1, 2)
    k = k_buf.index_select(0, slots).unsqueeze(0).transpose(1, 2)
    v = v_buf.index_select(0, slots).unsqueeze(0).transpose(1, 2)
    o_new, lse_new = _attend(qh, k[:, :, prefix:], v[:, :, prefix:], True, scale)
    if prefix == 0:
        return out.copy_(o_new)
    o_prefix, lse_prefix = _attend(qh, k[:, :, :prefix], v[:, :, :prefix], False, scale)
    return merge_states(o_prefix, lse_prefix, o_new, lse_new, out)
