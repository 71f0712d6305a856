"""Replica choice of the data-parallel controller: which of the `dp_size` model replicas gets a request.

Load accounting. Each replica reports its load now and then (`SchedulerStats`); requests sent to it after
a report are not in that report yet. So per replica the balancer keeps the last report's requests
(running + waiting) and tokens in flight, the count of requests dispatched so far (`sent`) and the token
counts of those not yet received. A report says how many requests the replica has taken in
(`num_received`): the last `sent - num_received` dispatches are still in transit. A replica's load is
reported + in transit, so a burst of requests between two reports spreads over the replicas instead of all
going to the one that looked least loaded, and nothing is counted twice. A report with a lower
`num_received` than one already seen is stale (out of order) and ignored.

Methods:

- `round_robin`: 0, 1, ..., dp_size - 1, 0, ... regardless of load.
- `total_requests`: the fewest requests (reported + in transit); ties go to the lowest dp rank.
- `total_tokens`: the fewest tokens (reported tokens in flight + prompt tokens in transit); ties go to the
  fewest requests, then the lowest dp rank.
- `cache_aware` (the default when dp_size > 1): the balancer keeps, per replica, a prefix tree of the token
  ids it sent there, bounded to the replica's KV cache size (least recently used leaves evicted first), as
  a guess of what that replica's prefix cache holds. A request goes to the replica whose tree matches the
  longest prefix of its prompt (equal matches: the least loaded of them) when the match is worth it, i.e.
  covers at least CACHE_MIN_MATCH_FRACTION (half) of the prompt or at least CACHE_MIN_MATCH_TOKENS (256)
  tokens, and that replica is not overloaded. A replica is overloaded when its request load exceeds the
  least loaded replica's by more than BALANCE_ABS_THRESHOLD (4) requests and is more than
  BALANCE_REL_THRESHOLD (1.5) times it. Otherwise the request goes to the least loaded replica by requests
  (ties: the smaller tree, i.e. the more free cache room, then the lowest dp rank). The chosen replica's
  tree gets the prompt inserted, also for requests pinned to a replica (`routed_dp_rank`).
"""

from __future__ import annotations

import heapq
from collections import deque

from gridserve.mem_cache.prefix_match import common_prefix_len

METHODS = ("round_robin", "total_requests", "total_tokens", "cache_aware")

# A match below half the prompt saves less prefill than running on a less loaded replica gains.
CACHE_MIN_MATCH_FRACTION = 0.5
# A long shared prefix (a system prompt, a document) is worth reusing even when it is under half the prompt.
CACHE_MIN_MATCH_TOKENS = 256
# Small absolute gaps in request counts are noise between reports: never leave a cache hit for them.
BALANCE_ABS_THRESHOLD = 4
# The gap must also be large relative to the load, so busy replicas keep their cache hits.
BALANCE_REL_THRESHOLD = 1.5
# Tree bound before the replica reports its KV cache size.
DEFAULT_TREE_TOKENS = 1 << 20


class _Node:
    __slots__ = ("key", "children", "parent", "tick")

    def __init__(self, key: list[int], parent: _Node | None, tick: int):
        self.key = key  # the edge's token segment (from the parent to this node)
        self.children: dict[int, _Node] = {}  # keyed by the child's first token
        self.parent = parent
        self.tick = tick  # last access; a node's tick is never older than its children's


class PrefixTree:
    """Radix tree of token id sequences, bounded in tokens with least-recently-used eviction of leaves."""

    def __init__(self, max_tokens: int = DEFAULT_TREE_TOKENS):
        self.max_tokens = max_tokens
        self.root = _Node([], None, 0)
        self._size = 0
        self._tick = 0

    @property
    def size(self) -> int:
        """Tokens held (the sum of the edge lengths)."""
        return self._size

    def _low_mark(self) -> int:
        # Evict down to 90% of the bound, so the leaf scan runs once per ~10% of the bound inserted.
        return self.max_tokens - self.max_tokens // 10

    def match(self, ids: list[int], touch: bool = True) -> int:
        """Length of the longest prefix of ids held in the tree; touch=True refreshes the matched path."""
        if touch:
            self._tick += 1
        node, pos = self.root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                break
            n = common_prefix_len(child.key, ids, pos)
            if touch:
                child.tick = self._tick
            pos += n
            if n < len(child.key):
                break
            node = child
        return pos

    def insert(self, ids: list[int]) -> None:
        """Adds ids (refreshing its whole path), then evicts if the tree is over its bound."""
        ids = list(ids[: self._low_mark()])  # only a prompt's head can fit; keeping it makes eviction spare it
        self._tick += 1
        node, pos = self.root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                node.children[ids[pos]] = _Node(ids[pos:], node, self._tick)
                self._size += len(ids) - pos
                break
            n = common_prefix_len(child.key, ids, pos)
            if n < len(child.key) and pos + n < len(ids):  # diverges inside the edge
                child = self._split(child, n)
            child.tick = self._tick
            pos += n
            node = child
        if self._size > self.max_tokens:
            self.evict(self._low_mark())

    def _split(self, node: _Node, n: int) -> _Node:
        """Cuts node's edge after n tokens; returns the new upper node."""
        upper = _Node(node.key[:n], node.parent, node.tick)
        upper.parent.children[upper.key[0]] = upper
        node.key = node.key[n:]
        node.parent = upper
        upper.children[node.key[0]] = node
        return upper

    def resize(self, max_tokens: int) -> None:
        """Sets a new bound, evicting at once if the tree no longer fits."""
        self.max_tokens = max_tokens
        if self._size > max_tokens:
            self.evict(self._low_mark())

    def evict(self, max_tokens: int) -> None:
        """Removes least recently used leaves until at most max_tokens are held."""
        if self._size <= max_tokens:
            return
        heap = [(n.tick, id(n), n) for n in self._leaves()]
        heapq.heapify(heap)
        while self._size > max_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            self._size -= len(leaf.key)
            if parent is not self.root and not parent.children:  # its tick >= the popped one: order holds
                heapq.heappush(heap, (parent.tick, id(parent), parent))

    def _leaves(self) -> list[_Node]:
        leaves, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                leaves.append(node)
        return leaves


class _Replica:
    __slots__ = ("reported_reqs", "reported_waiting", "reported_tokens", "received", "sent", "transit",
                 "transit_tokens", "tree")

    def __init__(self, tree: PrefixTree | None):
        self.reported_reqs = 0  # running + waiting in the last accepted report
        self.reported_waiting = 0
        self.reported_tokens = 0  # tokens_in_flight in the last accepted report
        self.received = 0  # num_received of the last accepted report
        self.sent = 0  # requests dispatched to it since start
        self.transit: deque[int] = deque()  # prompt lengths of the dispatched requests not yet received
        self.transit_tokens = 0  # sum(transit), kept so loads() is O(dp_size)
        self.tree = tree


class LoadBalancer:
    """Chooses a replica per request and tracks replica loads from dispatches and load reports."""

    def __init__(self, method: str, dp_size: int, tree_tokens: int | None = None, max_queued: int | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown load balance method {method!r}; expected one of {METHODS}")
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        self.method = method
        self.dp_size = dp_size
        self.tree_tokens = tree_tokens  # None: follow each replica's reported KV cache size
        bound = DEFAULT_TREE_TOKENS if tree_tokens is None else tree_tokens
        self.replicas = [_Replica(PrefixTree(bound) if method == "cache_aware" else None) for _ in range(dp_size)]
        self._next = 0  # round robin position
        self.max_queued = max_queued  # --max-queued-requests: a replica with this many waiting is full

    def loads(self) -> list[tuple[int, int]]:
        """(requests, tokens) per replica: the last report plus the requests in transit."""
        return [(r.reported_reqs + len(r.transit), r.reported_tokens + r.transit_tokens) for r in self.replicas]

    def choose(self, input_ids: list[int]) -> int:
        """Picks the replica for a request and records the dispatch to it."""
        if self.method == "round_robin":
            rank = self._next
            self._next = (self._next + 1) % self.dp_size
        elif self.method == "total_requests":
            loads = self.loads()
            rank = min(range(self.dp_size), key=lambda i: (loads[i][0], i))
        elif self.method == "total_tokens":
            loads = self.loads()
            rank = min(range(self.dp_size), key=lambda i: (loads[i][1], loads[i][0], i))
        else:
            rank = self._choose_cache_aware(input_ids)
        if self._full(rank):  # another replica with room takes it; when all are full, the choice refuses it
            room = [i for i in range(self.dp_size) if not self._full(i)]
            if room:
                loads = self.loads()
                rank = min(room, key=lambda i: (loads[i][0], i))
        self.dispatch(rank, input_ids)
        return rank

    def _full(self, i: int) -> bool:
        """Whether replica i's queue is full, counting the requests on their way to it as waiting."""
        r = self.replicas[i]
        return self.max_queued is not None and r.reported_waiting + len(r.transit) >= self.max_queued

    def _choose_cache_aware(self, input_ids: list[int]) -> int:
        reqs = [load[0] for load in self.loads()]
        least = min(range(self.dp_size), key=lambda i: (reqs[i], self.replicas[i].tree.size, i))
        # Matching does not refresh recency: only the chosen replica's cache will see the request.
        matches = [r.tree.match(input_ids, touch=False) for r in self.replicas]
        longest = max(matches)
        if longest == 0:
            return least
        best = min((i for i in range(self.dp_size) if matches[i] == longest), key=lambda i: (reqs[i], i))
        worth = longest >= CACHE_MIN_MATCH_FRACTION * len(input_ids) or longest >= CACHE_MIN_MATCH_TOKENS
        low = reqs[least]
        overloaded = reqs[best] - low > BALANCE_ABS_THRESHOLD and reqs[best] > BALANCE_REL_THRESHOLD * low
        return best if worth and not overloaded else least

    def dispatch(self, dp_rank: int, input_ids: list[int]) -> None:
        """Records a request sent to dp_rank (chosen here, or pinned by the caller)."""
        r = self.replicas[dp_rank]
        r.sent += 1
        r.transit.append(len(input_ids))
        r.transit_tokens += len(input_ids)
        if r.tree is not None:
            r.tree.insert(input_ids)

    def on_report(self, stats) -> None:
        """Takes a replica's SchedulerStats; a report older than one already seen is ignored."""
        if not 0 <= stats.dp_rank < self.dp_size:
            raise ValueError(f"load report from dp_rank {stats.dp_rank}, but dp_size is {self.dp_size}")
        r = self.replicas[stats.dp_rank]
        if stats.num_received < r.received:
            return
        r.received = stats.num_received
        r.reported_reqs = stats.num_running + stats.num_waiting
        r.reported_waiting = stats.num_waiting
        r.reported_tokens = stats.tokens_in_flight
        # The replica took in the oldest dispatches: the last (sent - received) ones are still in transit.
        in_transit = max(0, r.sent - r.received)
        while len(r.transit) > in_transit:
            r.transit_tokens -= r.transit.popleft()
        if r.tree is not None and self.tree_tokens is None and stats.max_total_num_tokens > 0:
            r.tree.resize(stats.max_total_num_tokens)
