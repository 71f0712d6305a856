"""Radix tree prefix cache keyed by token ids (the RadixCache idea from SGLang).

Each edge holds a token segment and the KV slots computed for it. Requests lock the path they
reuse (lock_ref), so only unlocked subtrees can be evicted, least recently used leaf first.
"""

from __future__ import annotations

import heapq
import itertools

import torch

from gridserve.mem_cache.memory_pool import TokenToKVPoolAllocator
from gridserve.mem_cache.prefix_match import common_prefix_len

# Monotonic logical clock: deterministic LRU order, no ties between distinct accesses.
_clock = itertools.count()


class TreeNode:
    __slots__ = ("key", "value", "children", "parent", "lock_ref", "last_access_time")

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None = None):
        self.key = key
        self.value = value
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access_time = next(_clock)

    def __repr__(self) -> str:
        return f"TreeNode(key={self.key}, lock_ref={self.lock_ref})"


class RadixCache:
    def __init__(self, allocator: TokenToKVPoolAllocator):
        self.allocator = allocator
        self.device = allocator.device
        self.reset()

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def reset(self) -> None:
        """Drop the whole tree, returning its slots. Only call when no request holds a lock."""
        if getattr(self, "root_node", None) is not None:
            self.allocator.free(self.all_values())
        self.root_node = TreeNode([], self._empty())
        self._evictable = 0
        self._protected = 0

    # ---- lookup / insert -------------------------------------------------------------------

    def _split(self, node: TreeNode, n: int) -> TreeNode:
        """Cut node's segment after n tokens; the new upper node is returned. The original node object
        stays the lower part, so a request holding it still unlocks the right path."""
        upper = TreeNode(node.key[:n], node.value[:n], node.parent)
        upper.lock_ref = node.lock_ref
        upper.last_access_time = node.last_access_time
        upper.children = {node.key[n]: node}
        node.parent.children[node.key[0]] = upper
        node.parent = upper
        node.key = node.key[n:]
        node.value = node.value[n:]
        return upper

    def match_prefix(self, key: list[int]) -> tuple[torch.Tensor, TreeNode]:
        node = self.root_node
        values = []
        i = 0
        while i < len(key) and key[i] in node.children:
            child = node.children[key[i]]
            child.last_access_time = next(_clock)
            n = common_prefix_len(child.key, key, i)
            if n < len(child.key):
                child = self._split(child, n)
            # After a split the next token differs from the rest of the old segment, so the loop ends.
            values.append(child.value)
            node = child
            i += n
        value = torch.cat(values) if values else self._empty()
        return value, node

    def match_len(self, key: list[int]) -> int:
        """How many leading tokens of key the cache holds: match_prefix's length, without its slots, splits or
        access-time updates (a look that changes nothing)."""
        node, i = self.root_node, 0
        while i < len(key) and key[i] in node.children:
            node = node.children[key[i]]
            n = common_prefix_len(node.key, key, i)
            i += n
            if n < len(node.key):
                break
        return i

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        if len(key) != value.numel():
            raise ValueError(f"key has {len(key)} tokens but value has {value.numel()} slots")
        node = self.root_node
        i = 0
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                # The tree takes ownership of the new tail only; clone so it does not pin the caller's tensor.
                leaf = TreeNode(list(key[i:]), value[i:].to(self.device, torch.int64, copy=True), node)
                node.children[key[i]] = leaf
                self._evictable += len(leaf.key)
                return i
            child.last_access_time = next(_clock)
            n = common_prefix_len(child.key, key, i)
            if n < len(child.key):
                child = self._split(child, n)
            node = child
            i += n
        return len(key)

    # ---- locking ---------------------------------------------------------------------------

    def inc_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root_node:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        while node is not self.root_node:
            if node.lock_ref <= 0:
                raise RuntimeError(f"dec_lock_ref on unlocked node {node!r}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
            node = node.parent

    # ---- eviction --------------------------------------------------------------------------

    def _nodes(self) -> list[TreeNode]:
        """Every node except the root."""
        out, stack = [], list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def evict(self, num_tokens: int) -> int:
        # (time, tiebreak, node): the counter breaks ties so TreeNodes are never compared.
        tie = itertools.count()
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heap = [(n.last_access_time, next(tie), n) for n in leaves]
        heapq.heapify(heap)
        freed, victims = 0, []
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[node.key[0]]
            victims.append(node.value)
            freed += len(node.key)
            self._evictable -= len(node.key)
            if parent is not self.root_node and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access_time, next(tie), parent))
        if victims:
            self.allocator.free(torch.cat(victims))
        return freed

    # ---- sizes / debugging -----------------------------------------------------------------

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def all_values(self) -> torch.Tensor:
        values = [n.value for n in self._nodes()]
        return torch.cat(values) if values else self._empty()
