"""Prefix matching of token id lists, shared by the scheduler's radix cache and the DP controller's prefix trees
(this module imports nothing, so the controller stays free of torch)."""


def common_prefix_len(seg: list[int], key: list[int], start: int = 0) -> int:
    """Length of the common prefix of seg and key[start:]. The list comparisons run in C: a whole segment that
    matches (the common case) costs one; otherwise a binary search (equality of prefixes is monotonic)."""
    n = min(len(seg), len(key) - start)
    if key[start : start + n] == seg[:n]:
        return n
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if key[start : start + mid] == seg[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
