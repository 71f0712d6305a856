from dataclasses import dataclass

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gridserve.mem_cache.memory_pool import TokenToKVPoolAllocator
from gridserve.mem_cache.prefix_match import common_prefix_len as _common_len
from gridserve.mem_cache.radix_cache import RadixCache, TreeNode


def make(size: int = 32) -> tuple[TokenToKVPoolAllocator, RadixCache]:
    alloc = TokenToKVPoolAllocator(size)
    return alloc, RadixCache(alloc)


def put(alloc: TokenToKVPoolAllocator, cache: RadixCache, key: list[int]) -> tuple[int, torch.Tensor]:
    """Insert key with fresh slots, freeing the duplicated part as the scheduler would."""
    value = alloc.alloc(len(key))
    n = cache.insert(key, value)
    alloc.free(value[:n])
    return n, value


def sizes(cache: RadixCache) -> tuple[int, int, int]:
    return cache.evictable_size(), cache.protected_size(), cache.total_size()


# ---- unit tests ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(seg=st.lists(st.integers(0, 2), max_size=200), shared=st.integers(0, 200),
       tail=st.lists(st.integers(0, 2), max_size=80), start=st.integers(0, 20))
def test_common_len_is_the_length_of_the_common_prefix(seg, shared, tail, start):
    """The chunked comparison equals a token-by-token walk, for keys that share up to 200 tokens with the segment
    from `start` (lengths around the 64-token chunks included)."""
    key = [7] * start + seg[:shared] + tail
    n = 0
    while n < len(seg) and start + n < len(key) and seg[n] == key[start + n]:
        n += 1
    assert _common_len(seg, key, start) == n
    assert _common_len(key[start:], key, start) == len(key) - start


def test_match_empty_tree():
    _, cache = make()
    idx, node = cache.match_prefix([1, 2, 3])
    assert idx.dtype == torch.int64 and idx.numel() == 0
    assert node is cache.root_node
    idx, node = cache.match_prefix([])
    assert idx.numel() == 0 and node is cache.root_node
    assert sizes(cache) == (0, 0, 0)
    assert cache.all_values().numel() == 0


def test_exact_and_longer_match():
    alloc, cache = make()
    _, v = put(alloc, cache, [1, 2, 3, 4])
    idx, node = cache.match_prefix([1, 2, 3, 4])
    assert idx.tolist() == v.tolist() and node.key == [1, 2, 3, 4]
    idx, node = cache.match_prefix([1, 2, 3, 4, 5, 6])
    assert idx.tolist() == v.tolist() and node.key == [1, 2, 3, 4]
    assert cache.match_prefix([7])[0].numel() == 0


def test_partial_match_splits_node():
    alloc, cache = make()
    _, v = put(alloc, cache, [1, 2, 3, 4])
    idx, node = cache.match_prefix([1, 2, 9])
    assert idx.tolist() == v[:2].tolist()
    assert node.key == [1, 2] and node.parent is cache.root_node
    assert list(node.children) == [3] and node.children[3].key == [3, 4]
    assert node.children[3].value.tolist() == v[2:].tolist()
    assert sizes(cache) == (4, 0, 4)
    # matching the whole key still works across the split
    assert cache.match_prefix([1, 2, 3, 4])[0].tolist() == v.tolist()


def test_match_len_looks_without_splitting():
    alloc, cache = make()
    put(alloc, cache, [1, 2, 3, 4])
    put(alloc, cache, [1, 2, 5])
    before = sizes(cache), cache.root_node.children[1].key
    assert [cache.match_len(k) for k in ([1, 2, 3, 9], [1, 2, 5, 6], [1, 9], [7], [])] == [3, 3, 1, 0, 0]
    assert (sizes(cache), cache.root_node.children[1].key) == before


def test_insert_returns_already_present_length():
    alloc, cache = make()
    assert put(alloc, cache, [1, 2, 3, 4])[0] == 0
    assert put(alloc, cache, [1, 2, 3, 4])[0] == 4
    assert put(alloc, cache, [1, 2, 3, 4, 5, 6])[0] == 4
    assert put(alloc, cache, [1, 2, 7])[0] == 2  # diverges inside a segment: split
    assert put(alloc, cache, [1, 2])[0] == 2  # prefix of existing: nothing new
    assert put(alloc, cache, [])[0] == 0
    assert sizes(cache) == (7, 0, 7)
    assert alloc.available_size() == 32 - 7
    assert sorted(cache.all_values().tolist()) == sorted(set(cache.all_values().tolist()))


def test_insert_value_length_mismatch():
    alloc, cache = make()
    with pytest.raises(ValueError):
        cache.insert([1, 2], alloc.alloc(3))


def test_lru_eviction_order():
    alloc, cache = make()
    _, a = put(alloc, cache, [1, 1])
    _, b = put(alloc, cache, [2, 2])
    _, c = put(alloc, cache, [3, 3])
    cache.match_prefix([1, 1])  # a becomes most recent; b is now the LRU leaf
    free_before = alloc.available_size()
    assert cache.evict(1) == 2
    assert alloc.available_size() == free_before + 2
    assert sorted(alloc.free_slots().tolist()[-2:]) == sorted(b.tolist())
    assert cache.match_prefix([2, 2])[0].numel() == 0
    assert cache.evict(2) == 2  # then c
    assert cache.match_prefix([3, 3])[0].numel() == 0
    assert cache.match_prefix([1, 1])[0].tolist() == a.tolist()


def test_evict_parent_becomes_leaf():
    alloc, cache = make(8)
    put(alloc, cache, [1, 2, 3])
    put(alloc, cache, [1, 2, 4])  # [1,2] -> {[3], [4]}
    assert cache.evict(100) == 4
    assert sizes(cache) == (0, 0, 0)
    assert alloc.available_size() == 8
    assert cache.root_node.children == {}


def test_locked_nodes_never_evicted():
    alloc, cache = make()
    _, v = put(alloc, cache, [1, 2, 3, 4])
    put(alloc, cache, [5, 6])
    _, node = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(node)
    assert sizes(cache) == (2, 4, 6)
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 2, 3, 4])[0].tolist() == v.tolist()
    assert sizes(cache) == (0, 4, 4)
    cache.dec_lock_ref(node)
    assert sizes(cache) == (4, 0, 4)
    assert cache.evict(1) == 4
    with pytest.raises(RuntimeError):
        cache.dec_lock_ref(node)


def test_lock_survives_split_and_partial_eviction():
    alloc, cache = make()
    put(alloc, cache, [1, 2, 3, 4])
    _, node = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(node)
    put(alloc, cache, [1, 2, 9, 9])  # splits the locked node: [1,2] -> {[3,4] locked, [9,9]}
    assert node.key == [3, 4] and node.parent.key == [1, 2]
    assert node.parent.lock_ref == 1
    assert sizes(cache) == (2, 4, 6)
    assert cache.evict(100) == 2  # only [9, 9]
    cache.dec_lock_ref(node)
    assert sizes(cache) == (4, 0, 4)


def test_nested_locks_counters():
    alloc, cache = make()
    put(alloc, cache, [1, 2, 3, 4])
    _, short = cache.match_prefix([1, 2])
    _, full = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(short)
    cache.inc_lock_ref(full)
    assert sizes(cache) == (0, 4, 4)
    assert short.lock_ref == 2 and full.lock_ref == 1
    cache.dec_lock_ref(full)
    assert sizes(cache) == (2, 2, 4)
    assert cache.evict(100) == 2
    cache.dec_lock_ref(short)
    assert sizes(cache) == (2, 0, 2)


def test_reset_frees_everything():
    alloc, cache = make(16)
    put(alloc, cache, [1, 2, 3])
    put(alloc, cache, [1, 5])
    put(alloc, cache, [4])
    cache.reset()
    assert sizes(cache) == (0, 0, 0)
    assert cache.root_node.children == {}
    assert sorted(alloc.free_slots().tolist()) == list(range(1, 17))


# ---- property-based simulation of the scheduler's usage ---------------------------------------

SIZE = 24
tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=8)  # tiny vocab: prefixes collide


@dataclass
class Req:
    tokens: list[int]
    kv: torch.Tensor  # KV slots for tokens; kv[:prefix_len] belong to the tree, the rest is private
    prefix_len: int
    node: TreeNode  # locked


class CacheMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.alloc = TokenToKVPoolAllocator(SIZE)
        self.cache = RadixCache(self.alloc)
        self.slot_token = [-1] * (SIZE + 1)  # token each slot's KV was computed for
        self.reqs: list[Req] = []
        self.inserted: list[list[int]] = []

    # -- helpers --

    def _alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.alloc.available_size()
        if short > 0:
            event("evicted to allocate")
            self.cache.evict(short)
        return self.alloc.alloc(n)

    def _write(self, slots: torch.Tensor, toks: list[int]) -> None:
        for s, t in zip(slots.tolist(), toks, strict=True):
            self.slot_token[s] = t

    def _check_match(self, key: list[int], idx: torch.Tensor, node: TreeNode) -> None:
        assert [self.slot_token[s] for s in idx.tolist()] == key[: idx.numel()]
        path = []
        while node is not self.cache.root_node:
            path = node.key + path
            node = node.parent
        assert path == key[: idx.numel()]

    def _commit(self, req: Req) -> None:
        """insert + free the private duplicates + unlock (request finish / chunk boundary)."""
        new_prefix_len = self.cache.insert(req.tokens, req.kv)
        assert new_prefix_len >= req.prefix_len  # the locked prefix cannot have gone away
        if new_prefix_len > req.prefix_len:
            event("freed private duplicates")
        self.alloc.free(req.kv[req.prefix_len : new_prefix_len])
        self.cache.dec_lock_ref(req.node)
        self.inserted.append(req.tokens)

    # -- rules --

    @rule(tokens=tokens_st)
    def start(self, tokens):
        idx, node = self.cache.match_prefix(tokens)
        self._check_match(tokens, idx, node)
        self.cache.inc_lock_ref(node)
        new = self._alloc(len(tokens) - idx.numel())
        if new is None:  # not admitted
            event("not admitted")
            self.cache.dec_lock_ref(node)
            return
        self._write(new, tokens[idx.numel() :])
        self.reqs.append(Req(list(tokens), torch.cat([idx, new]), idx.numel(), node))

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100), more=tokens_st)
    def extend(self, i, more):
        req = self.reqs[i % len(self.reqs)]
        new = self._alloc(len(more))
        if new is None:
            return
        self._write(new, more)
        req.tokens = req.tokens + more
        req.kv = torch.cat([req.kv, new])

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        req = self.reqs.pop(i % len(self.reqs))
        self._commit(req)

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100))
    def chunk_boundary(self, i):
        req = self.reqs[i % len(self.reqs)]
        self._commit(req)
        idx, node = self.cache.match_prefix(req.tokens)
        assert idx.numel() == len(req.tokens)
        self._check_match(req.tokens, idx, node)
        self.cache.inc_lock_ref(node)
        req.kv, req.prefix_len, req.node = idx, idx.numel(), node

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100))
    def abort(self, i):
        req = self.reqs.pop(i % len(self.reqs))
        self.alloc.free(req.kv[req.prefix_len :])
        self.cache.dec_lock_ref(req.node)

    @rule(n=st.integers(0, SIZE + 2))
    def evict(self, n):
        ev, prot = self.cache.evictable_size(), self.cache.protected_size()
        free = self.alloc.available_size()
        freed = self.cache.evict(n)
        assert freed >= n if ev >= n else freed == ev
        assert self.cache.evictable_size() == ev - freed
        assert self.cache.protected_size() == prot
        assert self.alloc.available_size() == free + freed

    @rule(key=tokens_st)
    def match(self, key):
        n = self.cache.match_len(key)  # a look first: it must not split what match_prefix then walks
        idx, node = self.cache.match_prefix(key)
        self._check_match(key, idx, node)
        assert idx.numel() == n == self.cache.match_len(key)

    @precondition(lambda self: self.inserted)
    @rule(i=st.integers(0, 100))
    def match_inserted(self, i):
        key = self.inserted[i % len(self.inserted)]
        idx, node = self.cache.match_prefix(key)
        self._check_match(key, idx, node)

    @precondition(lambda self: not self.reqs)
    @rule()
    def reset(self):
        self.cache.reset()
        assert self.cache.total_size() == 0
        self.inserted.clear()

    # -- invariants, checked after every step --

    @invariant()
    def slots_partitioned(self):
        parts = [self.alloc.free_slots(), self.cache.all_values()]
        parts += [r.kv[r.prefix_len :] for r in self.reqs]
        owned = torch.cat(parts)
        # each usable slot in exactly one owner; slot 0 never handed out
        assert owned.numel() == SIZE
        assert owned.sort().values.tolist() == list(range(1, SIZE + 1))
        assert self.alloc.available_size() == parts[0].numel()

    @invariant()
    def tree_consistent(self):
        root = self.cache.root_node
        expected_lock: dict[int, int] = {}
        for r in self.reqs:
            # the locked path is still attached and still holds the request's prefix slots
            node, keys, values = r.node, [], []
            while node is not root:
                assert node.parent.children[node.key[0]] is node
                expected_lock[id(node)] = expected_lock.get(id(node), 0) + 1
                keys = node.key + keys
                values = node.value.tolist() + values
                node = node.parent
            assert keys == r.tokens[: r.prefix_len]
            assert values == r.kv[: r.prefix_len].tolist()
            assert [self.slot_token[s] for s in r.kv.tolist()] == r.tokens

        evictable = protected = 0
        stack = list(root.children.items())
        while stack:
            first, node = stack.pop()
            assert node.key and node.key[0] == first
            assert node.value.dtype == torch.int64 and node.value.numel() == len(node.key)
            assert [self.slot_token[s] for s in node.value.tolist()] == node.key
            assert node.lock_ref == expected_lock.get(id(node), 0)
            if node.lock_ref:
                protected += len(node.key)
            else:
                evictable += len(node.key)
            for tok, child in node.children.items():
                assert child.parent is node
                stack.append((tok, child))
        assert self.cache.evictable_size() == evictable
        assert self.cache.protected_size() == protected
        assert self.cache.total_size() == evictable + protected


CacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_cache_machine = CacheMachine.TestCase
