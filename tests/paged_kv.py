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
