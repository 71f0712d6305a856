"""Late launch (on unless --disable-late-launch): the overlap loop's prediction of when the decode step in flight
ends (LaunchClock, on given times), and the scheduler's event loop waiting for requests that long, through a real
Scheduler on CPU.

On CPU a step's tokens are ready when its launch returns, so the host never waits for them and the clock never
predicts a wait by itself; the GPU runs of docs/benchmarks.md measure what it buys there."""

import pytest

from gridserve.messages import BatchTokenIDOutput, TokenizedGenerateReq
from gridserve.model_loader.loader import load_model_config
from gridserve.sampling.sampling_params import SamplingParams
from gridserve.scheduler.launch_clock import SAFETY_S, LaunchClock
from gridserve.scheduler.scheduler import IDLE_POLL_MS, Scheduler
from gridserve.server_args import ServerArgs
from tests.tiny_models import make_tiny_model


def _steady(clock: LaunchClock, step_s: float, n: int = 3, start: float = 10.0, size: int = 4) -> float:
    """n decode steps of `size` requests, each waited for (the device busy throughout); returns the last end."""
    t = start
    for _ in range(n):
        clock.synced(True, size, 0.002, t)
        t += step_s
    return t - step_s


def test_the_wait_ends_a_host_launch_before_the_step_in_flight_should():
    clock = LaunchClock(True)
    end = _steady(clock, 0.006)
    clock.launched(0.0004, True)
    clock.launched(0.0003, True)
    clock.launched(0.0012, False)  # a prefill's launch follows an arrival, which ended the wait: not the margin
    # the step now in flight started at `end` and should take 6 ms; the launch needs 0.4 ms (the longest) + SAFETY_S
    assert clock.wait_s(True, 4, end + 0.001) == pytest.approx(0.006 - 0.001 - 0.0004 - SAFETY_S)
    assert clock.wait_s(True, 4, end + 0.0058) == 0.0  # too late to wait at all


def test_it_takes_the_shortest_recent_step_of_that_many_requests():
    clock = LaunchClock(True)
    for t in (10.0, 10.006, 10.0115, 10.0185):  # steps of 6, 5.5 and 7 ms
        clock.synced(True, 4, 0.002, t)
    assert clock.wait_s(True, 4, 10.0185) == pytest.approx(0.0055 - SAFETY_S)
    assert clock.wait_s(True, 3, 10.0185) == 0.0  # no step of 3 requests measured yet


def test_no_wait_without_a_prediction():
    assert LaunchClock(True).wait_s(True, 4, 0.0) == 0.0  # nothing measured
    off = LaunchClock(False)
    _steady(off, 0.006)
    assert off.wait_s(True, 4, 10.0) == 0.0 and not off.durations  # off: not even measured
    clock = LaunchClock(True)
    end = _steady(clock, 0.006)
    assert clock.wait_s(False, 4, end) == 0.0  # a prefill in flight: its length varies
    clock.synced(True, 4, 0.00005, end + 0.007)  # the host found the tokens ready: it had fallen behind, and the
    assert clock.wait_s(True, 4, end + 0.007) == 0.0  # device may have idled; when the next step began is unknown


def test_a_prefill_that_was_waited_for_starts_the_next_steps_clock():
    clock = LaunchClock(True)
    clock.synced(False, 1, 0.004, 10.0)  # a prefill ended at 10.0; its time is not a decode step's
    assert not clock.durations
    clock.synced(True, 4, 0.002, 10.006)
    assert list(clock.durations[4]) == [pytest.approx(0.006)]


def test_it_tells_when_new_requests_came():
    """/server_info's record of arrivals with a decode step in flight: during a wait, and how long after the end of
    the step before; or found at once, having come before the turn (too late for the wait, or with none)."""
    clock = LaunchClock(True)
    end = _steady(clock, 0.006)
    clock.arrived(2, True, end + 0.003)
    clock.arrived(1, True, end + 0.001)
    clock.arrived(3, False, end + 0.0045)
    clock.arrived(0, True, end + 0.002)  # a turn with no new request
    shown = clock.state()
    assert shown["arrived_in_wait"] == 3 and shown["arrived_before_turn"] == 3
    assert shown["arrival_ms_after_step_end"] == {"p10": 1.0, "p50": 3.0, "p90": 3.0}
    off = LaunchClock(False)
    off.arrived(2, False, 1.0)
    assert off.arrived_before == 0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", path)
    return str(path)


def _run_loop(model: str, late: bool) -> tuple[dict, list, dict]:
    """Two requests through Scheduler.event_loop (the overlap loop on CPU). With late launch, every decode step is
    taken as waited for and 80 ms long (on CPU the host never waits: its launch computes the step). Returns the
    tokens of each request, recv's (timeout_ms, idle, decode in flight) at each call, and the scheduler's state."""
    args = ServerArgs(model_path=model, dtype="float32", device="cpu", max_total_tokens=2048,
                      enable_overlap_schedule=True, disable_late_launch=not late, show_progress=False)
    calls, outputs = [], []
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    pending = [[TokenizedGenerateReq(f"r{i}", [5, 7, 9, 11 + i], params, i) for i in range(2)]]

    def recv(timeout_ms: int) -> list:
        last = sched.last_batch
        calls.append((timeout_ms, sched.is_idle(), last is not None and last.mode.is_decode()))
        if pending:
            return pending.pop()
        sched.stopped = sched.is_idle()
        return []

    sched = Scheduler(args, model, load_model_config(model), None, recv=recv, send=outputs.append)
    clock = sched.launch_clock
    measured = clock.synced

    def synced(is_decode: bool, size: int, waited: float, now: float) -> None:
        measured(is_decode, size, waited, now)
        if late and is_decode:
            clock.durations[size], clock.device_free_at = [0.08], now

    clock.synced = synced
    sched.event_loop()
    ids: dict[str, list] = {"r0": [], "r1": []}
    for out in outputs:
        if isinstance(out, BatchTokenIDOutput):
            for rid, new in zip(out.reqs.rids, out.reqs.new_token_ids, strict=True):
                ids[rid] += new
    return ids, calls, sched.get_internal_state()


def test_the_event_loop_waits_as_the_clock_says(tiny_llama):
    """With late launch and a decode step in flight the loop asks recv to wait as long as the clock allows (80 ms
    less the margin and the time since the step began); idle, it waits IDLE_POLL_MS; without late launch it never
    waits with work in flight. The tokens are the same either way."""
    late_ids, late_calls, late_state = _run_loop(tiny_llama, True)
    ids, calls, state = _run_loop(tiny_llama, False)
    assert ids == late_ids and all(len(v) == 6 for v in ids.values())
    for c in (calls, late_calls):
        assert c[0] == (IDLE_POLL_MS, True, False) and c[-1][:2] == (IDLE_POLL_MS, True)
    waits = [ms for ms, idle, decode in late_calls if decode and not idle]
    # the first decode in flight follows the prefill: no decode step measured yet, so no wait
    assert len(waits) > 2 and waits[0] == 0 and all(40 <= ms < 80 for ms in waits[1:]), waits
    assert {ms for ms, idle, _ in calls if not idle} == {0}
    # /server_info tells how often the loop waited and why it did not (here: once, before a step was measured)
    shown = late_state["late_launch"]
    assert shown["waited"] == len(waits) - 1 and shown["no_estimate"] >= 1 and shown["too_late"] == 0
    assert 40 * (len(waits) - 1) <= shown["wait_ms"] < 80 * (len(waits) - 1) and shown["step_ms"][2] == 80
    assert "late_launch" not in state
