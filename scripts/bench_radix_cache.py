"""Host cost of the radix cache at a server's scale, on one CPU core: a cache of N cached requests (~600 tokens, 20
shared 300-token system prompts), then eviction the way a full cache meets it (what KVManager.alloc asks for one
decode step of 256 rows), matching a cached 32k-token prompt, and match_len of an 800-token prompt. Usage:
    python scripts/bench_radix_cache.py [--cached-requests 2000]"""

import argparse
import random
import time

from gridserve.mem_cache.memory_pool import TokenToKVPoolAllocator
from gridserve.mem_cache.radix_cache import RadixCache
from gridserve.scheduler.kv_manager import EVICT_SLACK


def per_call_ms(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cached-requests", type=int, default=2000)
    a = p.parse_args()
    rng = random.Random(0)
    alloc = TokenToKVPoolAllocator(a.cached_requests * 700 + 40000)
    cache = RadixCache(alloc)
    systems = [[rng.randrange(50000) for _ in range(300)] for _ in range(20)]
    for i in range(a.cached_requests):
        key = systems[i % 20] + [rng.randrange(50000) for _ in range(rng.randrange(100, 600))]
        slots = alloc.alloc(len(key))
        alloc.free(slots[: cache.insert(key, slots)])
    print(f"{a.cached_requests} cached requests, {cache.total_size()} tokens")
    print(f"evict(256), one decode step's worth: {per_call_ms(lambda: cache.evict(256), 50):.3f} ms a call; "
          f"KVManager takes 1/{EVICT_SLACK} of the pool at once instead ({alloc.size // EVICT_SLACK} tokens)")
    big = [rng.randrange(50000) for _ in range(32000)]
    cache.insert(big, alloc.alloc(32000))
    print(f"match_prefix of a cached 32k-token prompt: {per_call_ms(lambda: cache.match_prefix(big), 20):.3f} ms")
    q = systems[3] + [rng.randrange(50000) for _ in range(500)]
    print(f"match_len of an 800-token prompt (300 cached): {per_call_ms(lambda: cache.match_len(q), 200):.4f} ms")


if __name__ == "__main__":
    main()
