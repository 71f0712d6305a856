import pytest
import torch

from gridserve.mem_cache.memory_pool import KVCache, ReqToTokenPool, TokenToKVPoolAllocator

# ---- ReqToTokenPool ------------------------------------------------------------------------


def test_req_pool_alloc_free():
    pool = ReqToTokenPool(3, 8)
    assert pool.req_to_token.shape == (3, 8)
    assert pool.req_to_token.dtype == torch.int32
    assert not pool.req_to_token.any()
    rows = [pool.alloc() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2]
    assert pool.available_size() == 0
    assert pool.alloc() is None
    pool.free(rows[1])
    assert pool.available_size() == 1
    assert pool.alloc() == rows[1]


def test_req_pool_double_free_and_bad_index():
    pool = ReqToTokenPool(2, 4)
    idx = pool.alloc()
    pool.free(idx)
    with pytest.raises(ValueError):
        pool.free(idx)
    with pytest.raises(ValueError):
        pool.free(1)  # never allocated
    with pytest.raises(ValueError):
        pool.free(2)
    with pytest.raises(ValueError):
        pool.free(-1)


def test_req_pool_clear():
    pool = ReqToTokenPool(4, 4)
    for _ in range(4):
        pool.alloc()
    pool.clear()
    assert pool.available_size() == 4
    assert {pool.alloc() for _ in range(4)} == {0, 1, 2, 3}


# ---- TokenToKVPoolAllocator -----------------------------------------------------------------


def test_allocator_alloc_free():
    a = TokenToKVPoolAllocator(10)
    assert a.available_size() == 10
    x = a.alloc(4)
    assert x.dtype == torch.int64 and x.numel() == 4
    y = a.alloc(6)
    both = torch.cat([x, y])
    assert sorted(both.tolist()) == list(range(1, 11))  # distinct, slot 0 never handed out
    assert a.available_size() == 0
    a.free(x)
    assert a.available_size() == 4
    z = a.alloc(4)
    assert sorted(z.tolist()) == sorted(x.tolist())


def test_allocator_exhaustion_allocates_nothing():
    a = TokenToKVPoolAllocator(5)
    a.alloc(3)
    assert a.alloc(3) is None
    assert a.available_size() == 2
    assert a.alloc(2).numel() == 2
    assert a.alloc(1) is None


def test_allocator_empty_and_zero():
    a = TokenToKVPoolAllocator(3)
    a.free(torch.empty(0, dtype=torch.int64))
    assert a.available_size() == 3
    assert a.alloc(0).numel() == 0
    with pytest.raises(ValueError):
        a.alloc(-1)


def test_allocator_batched_frees_and_clear():
    a = TokenToKVPoolAllocator(8)
    x = a.alloc(8)
    for s in x.split(3):  # several pending frees, merged lazily
        a.free(s.to(torch.int32))
    assert a.available_size() == 8
    assert sorted(a.free_slots().tolist()) == list(range(1, 9))
    got = a.alloc(8)
    assert got.dtype == torch.int64 and sorted(got.tolist()) == list(range(1, 9))
    a.clear()
    assert a.available_size() == 8
    assert sorted(a.free_slots().tolist()) == list(range(1, 9))


def test_allocator_never_returns_slot_zero_under_churn():
    a = TokenToKVPoolAllocator(6)
    g = torch.Generator().manual_seed(0)
    held = []
    for _ in range(200):
        if held and torch.rand(1, generator=g).item() < 0.5:
            a.free(held.pop(0))
        else:
            n = int(torch.randint(0, 4, (1,), generator=g))
            x = a.alloc(n)
            if x is not None:
                held.append(x)
        owned = torch.cat([*held, a.free_slots()]) if held else a.free_slots()
        assert sorted(owned.tolist()) == list(range(1, 7))


# ---- KVCache -------------------------------------------------------------------------------


def test_kv_cache_shapes_and_round_trip():
    kv = KVCache(size=6, num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16)
    assert len(kv.k_buffers) == len(kv.v_buffers) == 2
    assert kv.k_buffers[0].shape == (7, 2, 4) and kv.k_buffers[0].dtype == torch.bfloat16
    loc = torch.tensor([3, 1, 6])
    k = torch.randn(3, 2, 4)  # float32 in, cast to bf16
    v = torch.randn(3, 2, 4)
    kv.set_kv(1, loc, k, v)
    kb, vb = kv.get_kv(1)
    assert torch.equal(kb[loc], k.to(torch.bfloat16))
    assert torch.equal(vb[loc], v.to(torch.bfloat16))
    assert not kv.k_buffers[0].any()  # other layer untouched
    assert not kb[[0, 2, 4, 5]].any()  # other rows untouched


def test_kv_cache_start_layer():
    kv = KVCache(size=4, num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32, start_layer=5)
    k = torch.ones(1, 1, 2)
    kv.set_kv(6, torch.tensor([2]), k, 2 * k)
    assert kv.k_buffers[1][2].eq(1).all() and kv.v_buffers[1][2].eq(2).all()
    assert kv.get_kv(5)[0] is kv.k_buffers[0]
    for bad in (0, 4, 7):
        with pytest.raises(IndexError):
            kv.get_kv(bad)


def test_kv_cache_padding_slot_write():
    # Padded batches write their dummy tokens to slot 0; it must be a real row.
    kv = KVCache(size=2, num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float16)
    kv.set_kv(0, torch.tensor([0, 0]), torch.ones(2, 1, 1), torch.ones(2, 1, 1))
    assert kv.k_buffers[0][0].item() == 1


def test_bytes_per_token():
    assert KVCache.bytes_per_token(32, 8, 128, torch.bfloat16) == 2 * 32 * 8 * 128 * 2
    assert KVCache.bytes_per_token(2, 1, 4, torch.float32) == 2 * 2 * 1 * 4 * 4
