"""Which waiting requests join the next prefill batch, under the token budgets and the KV memory left."""

from gridserve.mem_cache.prefix_match import common_prefix_len
from gridserve.scheduler.kv_manager import KVManager
from gridserve.scheduler.schedule_batch import Req

# Output tokens a running request is assumed to still need are capped at this (SGLang uses the same idea),
# then scaled by the scheduler's new_token_ratio, which rises after a retraction and decays otherwise.
CLIP_MAX_NEW_TOKENS = 4096


def _tokens_left(req: Req) -> int:
    """The output tokens a request may still need, capped at CLIP_MAX_NEW_TOKENS."""
    return min(req.params.max_new_tokens - len(req.output_ids), CLIP_MAX_NEW_TOKENS)


def reserved_decode_tokens(reqs: list[Req], ratio: float) -> int:
    return int(sum(_tokens_left(r) for r in reqs) * ratio)


# A running request is preempted at most this many times, so a stream of higher-priority requests cannot
# starve it: after that it keeps its place until it finishes.
MAX_PREEMPTIONS = 2


def order_waiting(waiting: list[Req], policy: str, kv: KVManager, priority_sign: int = 0) -> list[Req]:
    """fcfs keeps arrival order; lpm puts requests with the longest cached prefix first. With priority scheduling
    (priority_sign 1: larger first, -1: smaller first) priority comes before either, ties keep that order."""
    ordered = waiting
    if policy == "lpm" and kv.tree is not None:
        ordered = sorted(waiting, key=lambda r: -len(kv.tree.match_prefix(r.fill_ids[:-1])[0]))
    if priority_sign:
        ordered = sorted(ordered, key=lambda r: -priority_sign * r.priority)  # stable: ties keep their order
    return ordered


def preemption_victim(waiting_first: Req, running: list[Req], priority_sign: int, threshold: int) -> Req | None:
    """The running request `waiting_first` may take the place of: the one it beats by most (the newest among
    equals), if by more than `threshold`, and not already preempted MAX_PREEMPTIONS times or in flight."""
    candidates = [r for r in running if not r.pending and r.preemptions < MAX_PREEMPTIONS]
    if not candidates:
        return None
    victim = min(reversed(candidates), key=lambda r: priority_sign * r.priority)
    return victim if priority_sign * (waiting_first.priority - victim.priority) > threshold else None


# A waiting request whose prompt shares at least this many not-yet-cached tokens with a request already in the
# prefill batch being built, and at least half of what it would compute, waits one step and then finds them in the
# prefix cache (SGLang's in-batch prefix caching uses the same 32). Requests of one group that arrive together
# (a shared system prompt) then compute it once, not once each.
IN_BATCH_SHARED_MIN = 32


class PrefillAdder:
    """Builds one prefill batch. At most one request is split (the chunked request) per batch."""

    def __init__(self, kv: KVManager, running: list[Req], token_budget: int, max_running: int, ratio: float,
                 max_batch: int | None = None):
        """max_batch: at most this many requests join (a pipeline micro-batch's cap)."""
        self.kv = kv
        self.budget = token_budget
        self.ratio = ratio
        self.max_running, self.max_batch = max_running, max_batch
        self.batch: list[Req] = []
        # batch members that compute >= IN_BATCH_SHARED_MIN tokens, by (first computed position, its token id)
        self._computing: dict[tuple[int, int], list[Req]] = {}
        self.new_chunked: Req | None = None
        self.set_running(running)

    def set_running(self, running: list[Req]) -> None:
        """The running requests the batch joins: the slots left and the decode room they keep (counted again when
        a preemption took one of them away)."""
        self.slots_left = self.max_running - len(running)
        if self.max_batch is not None:
            self.slots_left = min(self.slots_left, self.max_batch)
        self.reserved = reserved_decode_tokens(running, self.ratio)
        self.has_running = bool(running)

    def _room(self) -> int:
        taken = sum(r.extend_len for r in self.batch)
        return self.kv.available() - self.reserved - taken

    def add_chunked(self, req: Req) -> None:
        """The request being prefilled in chunks continues first."""
        self._take(req)

    def add(self, req: Req) -> bool:
        """Tries to admit a waiting request; False means stop looking (keeps FCFS order fair)."""
        if not self._open():
            return False
        self.kv.attach(req)
        future = self._future(req)
        if not self._fits_attached(req, future):
            self.kv.release(req)
            return False
        self.slots_left -= 1
        self.reserved += int(future)
        self._take(req)
        return True

    def fits(self, req: Req) -> bool:
        """Whether add(req) would take it now; changes nothing."""
        if not self._open():
            return False
        self.kv.attach(req)
        ok = self._fits_attached(req, self._future(req))
        self.kv.release(req)
        return ok

    def waits_for_batch(self, req: Req) -> bool:
        """Whether req should wait a step: a request in this batch computes most of its uncached prompt. Within
        one admission the cache does not change, so such a request starts computing where req's cached prefix
        ends (a shorter match would have matched req's prefix too): only those are compared."""
        if self.kv.tree is None or not self._computing:
            return False
        ids = req.fill_ids
        cached = self.kv.tree.match_len(ids[:-1])
        if len(ids) - cached < IN_BATCH_SHARED_MIN:
            return False
        head = ids[: cached + IN_BATCH_SHARED_MIN]
        for other in self._computing.get((cached, ids[cached]), ()):
            other_ids = other.fill_ids
            if other_ids[: len(head)] != head:
                continue
            end = other.kv_len + other.extend_len  # the batch computes other's tokens [kv_len, end)
            shared = len(head) + common_prefix_len(other_ids[len(head):], ids, len(head))
            gain = min(shared, end) - cached
            if gain >= IN_BATCH_SHARED_MIN and 2 * gain >= len(ids) - cached:
                return True
        return False

    def _open(self) -> bool:
        return (self.budget > 0 and self.slots_left > 0 and self.new_chunked is None
                and self.kv.req_pool.available_size() > 0)

    def _future(self, req: Req) -> float:
        return _tokens_left(req) * self.ratio

    def _fits_attached(self, req: Req, future: float) -> bool:
        extend = len(req.fill_ids) - req.kv_len
        # With nothing else in flight, take it if its prompt fits at all: decode retraction handles the rest.
        return extend + future <= self._room() or not (
            self.batch or self.has_running or min(extend, self.budget) > self._room())

    def _take(self, req: Req) -> None:
        remaining = len(req.fill_ids) - req.kv_len
        req.extend_len = min(remaining, self.budget)
        if req.extend_len < remaining:
            self.new_chunked = req
        self.budget -= req.extend_len
        self.batch.append(req)
        if self.kv.tree is not None and req.extend_len >= IN_BATCH_SHARED_MIN:
            self._computing.setdefault((req.kv_len, req.fill_ids[req.kv_len]), []).append(req)


def admit(adder: PrefillAdder, ordered: list[Req]) -> list[Req]:
    """The longest prefix of `ordered` that the adder takes, skipping requests still pending on the device and
    those whose prompt a request in the batch mostly computes.
    The caller removes them from its queue afterwards: removing while iterating the same list skipped every
    other request (a burst was admitted half per step, out of order)."""
    admitted = []
    for req in ordered:
        if req.pending:  # retracted while its newest token was still on the device: next time
            continue
        if adder.waits_for_batch(req):  # its prompt is mostly computed in this batch: cached next step
            continue
        if not adder.add(req):
            break
        admitted.append(req)
    return admitted
