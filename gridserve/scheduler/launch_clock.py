"""When the overlap loop launches its next decode step (late launch; off with --disable-late-launch).

The overlap loop launches step i+1 before it waits for step i's tokens, so the device never idles between steps. A
request that arrives while step i runs is seen once step i is done; by then step i+1 has started, and the request's
prefill queues behind it too: on average one and a half decode steps before the prefill begins, against half a step
in the normal loop (for arrivals spread over a step; a closed-loop client's successors can all land at one point of
it). With late launch, the loop waits for new requests until just before step i should end and only then launches
step i+1, so a request that arrives in that window prefills right after step i.

When step i ends follows from the step before it: if the host had to wait for step i-1's tokens, the device was busy
until that wait returned, and step i, queued by then, started at that moment. Step i takes about as long as the
recent decode steps of as many requests (the shortest of the last few: contexts grow slowly, and a guess that is too
long would leave the device idle). The loop stops waiting `margin` before that end: the longest recent time the host
took from the end of its wait to a decode launch, plus SAFETY_S. Without a measured step (the first steps, a prefill in
flight, a host that fell behind) it does not wait at all: the plain overlap loop."""

from collections import Counter, deque

SAFETY_S = 0.0005  # more room before the predicted end: the TP broadcast of the requests, the OS waking the loop
BLOCKED_S = 0.0002  # a wait for a step's tokens this long means the device was still running that step
RECENT = 8  # steps (or launches) a prediction looks back on


class LaunchClock:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.durations: dict[int, deque] = {}  # decode batch size -> recent step times (s)
        self.host_times: deque = deque(maxlen=RECENT)  # from the end of a wait to the decode launch after it (s)
        self.device_free_at: float | None = None  # when the latest waited-for step ended, if the host waited for it
        # what each prediction gave (shown in /server_info): a wait; none for want of a measured decode step (or
        # with a prefill in flight); or none because the step in flight should end within the margin
        self.outcomes: Counter = Counter()
        self.waited_s = 0.0  # the waits granted, in all
        # new requests with a decode step in flight: how many came during a wait, and how long after the end of the
        # step before it (when the host sent that step's tokens on); how many had come before the turn began
        self.arrived_in_wait: deque = deque(maxlen=1024)
        self.arrived_before = 0

    def synced(self, is_decode: bool, batch_size: int, waited: float, now: float) -> None:
        """The host has read a launched step's tokens: it waited `waited` s for them, until `now`."""
        if not self.enabled:
            return
        blocked = waited >= BLOCKED_S
        if blocked and is_decode and self.device_free_at is not None:
            # this step started when the one before it ended (it was queued by then) and ended now
            self.durations.setdefault(batch_size, deque(maxlen=RECENT)).append(now - self.device_free_at)
        self.device_free_at = now if blocked else None

    def launched(self, host_time: float, is_decode: bool) -> None:
        """The loop launched a step `host_time` s after its wait for new requests ended. Only decode launches set
        the margin: the launch after a full wait is a decode, and a prefill follows an arrival, which ends the wait
        early (a prefill's launch, ~1 ms on the 8B against ~0.3, had closed the window 1.2-1.6 ms before the step's
        end on an H100)."""
        if self.enabled and is_decode:
            self.host_times.append(host_time)

    def wait_s(self, in_flight_is_decode: bool, in_flight_size: int, now: float) -> float:
        """How long the loop may wait for new requests before launching its next step, with a step in flight (a
        decode of in_flight_size requests, or not): 0 where nothing predicts when that step ends."""
        recent = self.durations.get(in_flight_size)
        if not (self.enabled and in_flight_is_decode and recent and self.device_free_at is not None):
            if self.enabled:
                self.outcomes["no_estimate"] += 1
            return 0.0
        wait = max(0.0, self.device_free_at + min(recent) - self.margin_s() - now)
        self.outcomes["waited" if wait > 0 else "too_late"] += 1
        self.waited_s += wait
        return wait

    def margin_s(self) -> float:
        """How long before the step in flight should end the wait stops: the longest recent decode launch's host
        time, plus SAFETY_S."""
        return max(self.host_times, default=0.0) + SAFETY_S

    def arrived(self, count: int, in_wait: bool, now: float) -> None:
        """recv returned `count` new requests; in_wait: it had been waiting for them."""
        if not (self.enabled and count):
            return
        if in_wait and self.device_free_at is not None:
            self.arrived_in_wait.extend([now - self.device_free_at] * count)
        elif not in_wait:
            self.arrived_before += count

    def state(self) -> dict:
        """For /server_info: how often the loop waited, and why it did not."""
        return {**{k: self.outcomes[k] for k in ("waited", "no_estimate", "too_late")},
                "wait_ms": round(self.waited_s * 1e3, 3),
                "margin_ms": round(self.margin_s() * 1e3, 3),
                "step_ms": {size: round(min(d) * 1e3, 3) for size, d in sorted(self.durations.items())},
                "arrived_in_wait": len(self.arrived_in_wait), "arrived_before_turn": self.arrived_before,
                "arrival_ms_after_step_end": _percentiles(self.arrived_in_wait)}


def _percentiles(values) -> dict:
    ranked = sorted(values)
    if not ranked:
        return {}
    return {f"p{q}": round(ranked[min(len(ranked) - 1, q * len(ranked) // 100)] * 1e3, 3) for q in (10, 50, 90)}
