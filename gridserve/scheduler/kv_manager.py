"""Glue between requests and the KV memory: prefix matching, slot allocation with eviction, and handing a
request's KV back to the radix cache (or freeing it when the cache is off)."""

import torch

from gridserve.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator
from gridserve.mem_cache.radix_cache import RadixCache
from gridserve.scheduler.schedule_batch import Req

# A full cache evicts at least this fraction of the pool at a time (least recently used first), so that
# eviction runs every few dozen decode steps, not at each (the cache keeps all but ~1% of what it would)
EVICT_SLACK = 128


class KVManager:
    def __init__(self, req_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator, use_radix_cache: bool):
        self.req_pool = req_pool
        self.allocator = allocator
        self.tree = RadixCache(allocator) if use_radix_cache else None
        self.num_evicted_tokens = 0

    def available(self) -> int:
        """Slots obtainable now: free ones plus those the cache could evict."""
        return self.allocator.available_size() + (self.tree.evictable_size() if self.tree else 0)

    def attach(self, req: Req) -> None:
        """Gives an admitted request a req_to_token row and reuses the longest cached prefix of its tokens
        (leaving at least one token to compute, whose logits give the next token)."""
        req.req_pool_idx = self.req_pool.alloc()
        assert req.req_pool_idx is not None, "caller checks req_pool availability"
        if self.tree is None:
            return
        prefix, node = self.tree.match_prefix(req.fill_ids[:-1])
        self._lock(req, prefix, node)

    def _lock(self, req: Req, prefix: torch.Tensor, node) -> None:
        self.tree.inc_lock_ref(node)
        n = len(prefix)
        self.req_pool.req_to_token[req.req_pool_idx, :n] = prefix.to(torch.int32)
        req.kv_len = req.cached_len = n
        req.last_node = node

    def alloc(self, n: int) -> torch.Tensor:
        short = n - self.allocator.available_size()
        if short > 0 and self.tree is not None:
            # An eviction walks the whole tree (2.4 ms with 2,000 cached requests on a CPU core), and with the
            # cache full every decode step would need one: take 1/EVICT_SLACK of the pool at once instead.
            self.num_evicted_tokens += self.tree.evict(max(short, self.allocator.size // EVICT_SLACK))
        slots = self.allocator.alloc(n)
        if slots is None:
            raise RuntimeError(f"KV cache out of memory: need {n} slots, {self.allocator.available_size()} free")
        return slots

    def _row(self, req: Req) -> torch.Tensor:
        return self.req_pool.req_to_token[req.req_pool_idx, : req.kv_len].long()

    def cache_unfinished(self, req: Req) -> None:
        """After a prefill (of a chunk or of the whole prompt): publish the computed prefix to the cache and continue
        from the cached copy, so a later request can share it and eviction accounting stays exact."""
        if self.tree is None:
            return
        tokens, slots = req.fill_ids[: req.kv_len], self._row(req)
        new_prefix_len = self.tree.insert(tokens, slots)
        self.allocator.free(slots[req.cached_len : new_prefix_len])
        self.tree.dec_lock_ref(req.last_node)
        prefix, node = self.tree.match_prefix(tokens)
        self._lock(req, prefix, node)

    def release(self, req: Req) -> None:
        """A finished or retracted request gives back its row; its KV goes to the cache (or is freed)."""
        if req.req_pool_idx is None:
            return
        slots = self._row(req)
        if self.tree is None:
            self.allocator.free(slots)
        else:
            new_prefix_len = self.tree.insert(req.fill_ids[: req.kv_len], slots)
            self.allocator.free(slots[req.cached_len : new_prefix_len])
            self.tree.dec_lock_ref(req.last_node)
        self.req_pool.free(req.req_pool_idx)
        req.reset_kv()

    def flush(self) -> None:
        if self.tree is not None:
            self.tree.reset()
