"""A random paged KV cache for kernel tests: slots scattered over the pool, request rows shuffled, and every
slot no request uses poisoned (the table's tail past each length points at poisoned slots)."""

import torch


def make_paged_kv(lens, num_kv_heads, head_dim, dtype, seed=0, poison=float("nan"), head_dim_v=None):
    """Returns (generator, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens) on the CPU; the generator
    continues the same random stream, for the caller's queries."""
    g = torch.Generator().manual_seed(seed)
    head_dim_v = head_dim_v or head_dim
    bs, total = len(lens), sum(lens)
    num_slots = total + 7
    max_reqs, max_ctx = bs + 2, max(lens) + 5
    k_buf = torch.randn(num_slots + 1, num_kv_heads, head_dim, generator=g).to(dtype)
    v_buf = torch.randn(num_slots + 1, num_kv_heads, head_dim_v, generator=g).to(dtype)
    used = torch.randperm(num_slots, generator=g)[:total] + 1  # slot 0 is padding and stays unused
    unused = torch.ones(num_slots + 1, dtype=torch.bool)
    unused[used] = False
    k_buf[unused] = poison
    v_buf[unused] = poison
    req_pool_indices = torch.randperm(max_reqs, generator=g)[:bs]
    req_to_token = torch.zeros(max_reqs, max_ctx, dtype=torch.int32)
    poisoned = unused.nonzero().flatten()
    off = 0
    for i, n in enumerate(lens):
        row = req_pool_indices[i]
        req_to_token[row, :n] = used[off : off + n].int()
        req_to_token[row, n:] = poisoned[torch.randint(len(poisoned), (max_ctx - n,), generator=g)].int()
        off += n
    return g, k_buf, v_buf, req_to_token, req_pool_indices, torch.tensor(lens, dtype=torch.int64)


def extend_reference(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, extend_lens, extend_start_loc, scale):
    """Causal extend attention in plain float32 PyTorch, request by request (rows no request covers: NaN)."""
    num_heads = q.shape[1]
    group = num_heads // k_buf.shape[1]
    out = torch.full((q.shape[0], num_heads, v_buf.shape[2]), float("nan"), dtype=torch.float32)
    k_buf, v_buf = k_buf.cpu(), v_buf.cpu()
    for i in range(len(seq_lens)):
        seq_len, n, start = int(seq_lens[i]), int(extend_lens[i]), int(extend_start_loc[i])
        slots = req_to_token[req_pool_indices[i], :seq_len].long().cpu()
        k = k_buf[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)  # (H, L, D)
        v = v_buf[slots].float().repeat_interleave(group, dim=1).transpose(0, 1)
        qi = q[start : start + n].cpu().float().transpose(0, 1)  # (H, n, D)
        s = torch.einsum("hnd,hld->hnl", qi, k) * scale
        visible = torch.ones(n, seq_len, dtype=torch.bool).tril(diagonal=seq_len - n)  # query j sees 0..prefix+j
        s = s.masked_fill(~visible, float("-inf"))
        out[start : start + n] = torch.einsum("hnl,hld->hnd", torch.softmax(s, dim=-1), v).transpose(0, 1)
    return out


def make_extend_case(prefix_lens, ext_lens, num_heads, num_kv_heads, head_dim, dtype, seed=0, poison=float("nan"),
                     device="cpu"):
    """(q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, extend_lens, extend_start_loc) on device: each
    request's prefix_lens[i] cached tokens and ext_lens[i] new ones, its K/V all in the paged cache."""
    lens = [p + e for p, e in zip(prefix_lens, ext_lens, strict=True)]
    g, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens = make_paged_kv(
        lens, num_kv_heads, head_dim, dtype, seed, poison)
    extend_lens = torch.tensor(ext_lens, dtype=torch.int64)
    extend_start_loc = torch.cumsum(extend_lens, 0) - extend_lens
    q = torch.randn(sum(ext_lens), num_heads, head_dim, generator=g).to(dtype)
    return tuple(t.to(device) for t in (q, k_buf, v_buf, req_to_token, req_pool_indices, seq_lens, extend_lens,
                                        extend_start_loc))
