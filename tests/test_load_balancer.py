"""The DP controller's replica choice: load accounting across bursts and reports, the four methods, and the
bounded prefix tree behind cache-aware routing."""

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.managers.load_balancer import (
    BALANCE_ABS_THRESHOLD,
    CACHE_MIN_MATCH_TOKENS,
    METHODS,
    LoadBalancer,
    PrefixTree,
)
from gridserve.messages import SchedulerStats


def report(lb, rank, received, running=0, waiting=0, tokens=0, capacity=0):
    lb.on_report(
        SchedulerStats(
            dp_rank=rank,
            num_received=received,
            num_running=running,
            num_waiting=waiting,
            tokens_in_flight=tokens,
            max_total_num_tokens=capacity,
        )
    )


def test_bad_arguments():
    with pytest.raises(ValueError):
        LoadBalancer("shortest_queue", 2)
    with pytest.raises(ValueError):
        LoadBalancer("round_robin", 0)
    lb = LoadBalancer("total_requests", 2)
    with pytest.raises(ValueError):
        report(lb, 2, 0)
    assert set(METHODS) == {"round_robin", "total_requests", "total_tokens", "cache_aware"}


def test_round_robin_ignores_load():
    lb = LoadBalancer("round_robin", 3)
    report(lb, 0, 0, running=100, tokens=10**6)
    assert [lb.choose([1, 2]) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("dp, n, expected", [(2, 10, [5, 5]), (3, 10, [4, 3, 3]), (4, 6, [2, 2, 1, 1])])
def test_burst_without_reports_spreads(dp, n, expected):
    lb = LoadBalancer("total_requests", dp)
    counts = Counter(lb.choose([7] * 10) for _ in range(n))
    assert [counts[i] for i in range(dp)] == expected
    assert lb.loads() == [(c, 10 * c) for c in expected]


def test_report_does_not_double_count():
    lb = LoadBalancer("total_requests", 2)
    for size in (10, 20, 30):
        lb.dispatch(0, [1] * size)
    assert lb.loads()[0] == (3, 60)
    # The replica took in the first two (10 + 20 tokens) and reports them; only the third is in transit.
    report(lb, 0, received=2, running=1, waiting=1, tokens=35)
    assert lb.loads()[0] == (2 + 1, 35 + 30)
    # It finished one of them and received the third.
    report(lb, 0, received=3, running=2, tokens=50)
    assert lb.loads()[0] == (2, 50)
    # Replica 1 (empty) is chosen over replica 0 (2 requests), then loads are even.
    assert lb.choose([5] * 4) == 1
    assert lb.choose([5] * 4) == 1
    assert lb.choose([5] * 4) == 0


def test_stale_report_ignored():
    lb = LoadBalancer("total_requests", 2)
    for _ in range(4):
        lb.dispatch(1, [1, 2, 3])
    report(lb, 1, received=4, running=1, tokens=9)
    assert lb.loads()[1] == (1, 9)
    report(lb, 1, received=2, running=2, waiting=2, tokens=99)  # older, delivered late
    assert lb.loads()[1] == (1, 9)
    report(lb, 1, received=4, running=0, tokens=0)  # same clock, newer figures: taken
    assert lb.loads()[1] == (0, 0)


def test_total_tokens_prefers_fewer_tokens_over_fewer_requests():
    lb = LoadBalancer("total_tokens", 2)
    lb.dispatch(0, [1] * 1000)
    for _ in range(3):
        lb.dispatch(1, [1] * 10)
    assert lb.choose([2] * 10) == 1
    # equal tokens: fewer requests wins, then the lower rank
    lb2 = LoadBalancer("total_tokens", 3)
    lb2.dispatch(0, [1] * 20)
    lb2.dispatch(0, [1] * 20)
    lb2.dispatch(1, [1] * 40)
    lb2.dispatch(2, [1] * 40)
    assert lb2.choose([3]) == 1
    report(lb, 1, received=3, tokens=5000, running=3)
    assert lb.choose([2] * 10) == 0


# ---- cache aware ----------------------------------------------------------------------------------------


def test_cache_aware_groups_stick_and_spread():
    rng = random.Random(0)
    dp, groups, per_group = 2, 8, 6
    prefixes = [[1000 * (g + 1) + i for i in range(300)] for g in range(groups)]
    order = [g for g in range(groups) for _ in range(per_group)]
    rng.shuffle(order)
    lb = LoadBalancer("cache_aware", dp)
    placed: dict[int, set[int]] = {g: set() for g in range(groups)}
    for g in order:
        rank = lb.choose(prefixes[g] + [rng.randrange(50_000, 60_000) for _ in range(30)])
        placed[g].add(rank)
        # replicas finish requests quickly: each reports having received everything, one still running
        for r in range(dp):
            report(lb, r, received=lb.replicas[r].sent, running=min(1, lb.replicas[r].sent))
    assert all(len(ranks) == 1 for ranks in placed.values()), placed
    per_replica = Counter(next(iter(ranks)) for ranks in placed.values())
    assert set(per_replica) == {0, 1} and min(per_replica.values()) >= 3, per_replica


def test_cache_aware_short_match_goes_to_least_loaded():
    lb = LoadBalancer("cache_aware", 2)
    prompt = list(range(100))
    lb.dispatch(0, prompt)
    lb.dispatch(0, [9999])
    # 40 of 100 tokens match on replica 0: under half and under 256 tokens, so the least loaded wins
    assert lb.choose(prompt[:40] + list(range(5000, 5060))) == 1
    # no match at all: the least loaded (replica 0 has 2 requests, replica 1 has 1)
    assert lb.choose([42_000, 42_001]) == 1
    # a match of more than half goes to the cached replica even though it is more loaded
    assert lb.choose(prompt[:60] + list(range(7000, 7040))) == 0


def test_cache_aware_long_absolute_match_counts():
    lb = LoadBalancer("cache_aware", 2)
    system = list(range(CACHE_MIN_MATCH_TOKENS))
    lb.dispatch(1, system)
    lb.dispatch(1, [5])
    # 256 matching tokens out of 1256: under half, but long enough to be worth it
    assert lb.choose(system + list(range(10_000, 11_000))) == 1


def test_cache_aware_skips_overloaded_replica():
    lb = LoadBalancer("cache_aware", 2)
    prompt = list(range(500))
    lb.dispatch(0, prompt)
    report(lb, 0, received=1, running=BALANCE_ABS_THRESHOLD, waiting=1)  # 5 requests
    report(lb, 1, received=0, running=0)
    # 5 vs 0: more than 4 above and more than 1.5x -> overloaded, go to replica 1
    assert lb.choose(prompt) == 1
    # now both trees hold the prompt; equal matches go to the less loaded one
    assert lb.choose(prompt) == 1
    # not overloaded when the gap is large in absolute terms but small relative to the load
    lb2 = LoadBalancer("cache_aware", 2)
    lb2.dispatch(0, prompt)
    report(lb2, 0, received=1, running=20)
    report(lb2, 1, received=0, running=15)
    assert lb2.choose(prompt) == 0


def test_pinned_dispatch_inserts_into_tree():
    lb = LoadBalancer("cache_aware", 3)
    prompt = list(range(64))
    lb.dispatch(2, prompt)
    assert [r.tree.match(prompt) for r in lb.replicas] == [0, 0, 64]
    assert lb.choose(prompt + [1, 2, 3]) == 2
    assert lb.loads()[2] == (2, 64 + 67)


def test_tree_bound_follows_report():
    lb = LoadBalancer("cache_aware", 1)
    lb.dispatch(0, list(range(1000)))
    report(lb, 0, received=1, capacity=500)
    assert lb.replicas[0].tree.size <= 500
    fixed = LoadBalancer("cache_aware", 1, tree_tokens=2000)
    fixed.dispatch(0, list(range(1000)))
    report(fixed, 0, received=1, capacity=500)
    assert fixed.replicas[0].tree.size == 1000


# ---- prefix tree ----------------------------------------------------------------------------------------


def test_tree_match_and_split():
    t = PrefixTree()
    t.insert([1, 2, 3, 4])
    assert t.match([1, 2, 3, 4, 5]) == 4
    assert t.match([1, 2, 9]) == 2
    assert t.match([7]) == 0
    t.insert([1, 2, 5])
    assert t.size == 5
    upper = t.root.children[1]
    assert upper.key == [1, 2] and sorted(upper.children) == [3, 5]
    assert upper.children[3].key == [3, 4] and upper.children[5].key == [5]
    assert t.match([1, 2, 3, 4]) == 4 and t.match([1, 2, 5, 6]) == 3 and t.match([1, 2, 6]) == 2
    t.insert([1, 2])  # already held: no growth
    assert t.size == 5


def test_tree_lru_eviction():
    t = PrefixTree(max_tokens=100)
    a, b, c = [1] + [0] * 39, [2] + [0] * 39, [3] + [0] * 39
    t.insert(a)
    t.insert(b)
    assert t.match(a) == 40  # refresh a: b is now the least recently used
    t.insert(c)  # 120 > 100: evict down to 90
    assert t.size == 80
    assert (t.match(a), t.match(b), t.match(c)) == (40, 0, 40)


def test_tree_evicts_leaves_before_shared_prefix():
    t = PrefixTree(max_tokens=100)
    shared = list(range(50))
    t.insert(shared + [100] * 20)
    t.insert(shared + [200] * 20)
    t.insert([300] * 15)  # 105 tokens: the oldest leaf (the [100] tail) goes, the shared prefix stays
    assert t.size == 85
    assert t.match(shared + [200] * 20) == 70
    assert t.match(shared + [100] * 20) == 50
    assert t.match([300] * 15) == 15


def test_tree_long_prompts_fast():
    # ~1M tokens in 256 prompts of 4096 sharing 1024-token heads: must stay well under a second
    rng = random.Random(1)
    heads = [[rng.randrange(1 << 16) for _ in range(1024)] for _ in range(16)]
    t = PrefixTree(max_tokens=1 << 19)
    for i in range(256):
        t.insert(heads[i % 16] + [rng.randrange(1 << 16) for _ in range(3072)])
        assert t.size <= 1 << 19
    assert t.match(heads[3] + [0] * 100) == 1024


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), max_size=10), max_size=12), st.lists(st.integers(0, 3), max_size=12))
def test_tree_matches_reference(seqs, query):
    t = PrefixTree(max_tokens=10**6)
    for s in seqs:
        t.insert(s)

    def common(x, y):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        return n

    for q in [query, *seqs]:
        assert t.match(q) == max((common(q, s) for s in seqs), default=0)
    # an uncompressed trie would have one token per distinct non-empty prefix
    assert t.size == len({tuple(s[:i]) for s in seqs for i in range(1, len(s) + 1)})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=15), max_size=20), st.integers(5, 40))
def test_tree_bounded_never_overclaims(seqs, bound):
    t = PrefixTree(max_tokens=bound)
    for s in seqs:
        t.insert(s)
        assert t.size <= bound
        assert t.match(s, touch=False) == min(len(s), bound - bound // 10)  # the newest insert survives
    for s in seqs:
        assert t.match(s) <= len(s)


@pytest.mark.parametrize("method", ["round_robin", "cache_aware", "total_requests"])
def test_a_full_replica_is_routed_around_until_every_replica_is_full(method):
    lb = LoadBalancer(method, 2, max_queued=2)
    prompt = list(range(300))
    lb.on_report(SchedulerStats(dp_rank=0, num_received=0, num_waiting=2, num_running=1))  # replica 0 is full
    assert [lb.choose(prompt) for _ in range(2)] == [1, 1]  # replica 1 takes both (2 now on their way to it)
    lb.choose(prompt)  # both full: the method's own choice goes through, and that replica refuses it (503)
    assert [r.sent for r in lb.replicas] in ([1, 2], [0, 3])
    lb.on_report(SchedulerStats(dp_rank=0, num_received=0, num_waiting=0, num_running=1))  # replica 0 drained
    assert lb.choose(prompt) == 0
