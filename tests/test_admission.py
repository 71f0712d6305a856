"""Admission (issue 24): which waiting requests join a prefill batch. A property over random queues, budgets,
slot caps and KV sizes, and a burst through a real scheduler (a tiny model, in-process): N <= cap requests are
admitted in one step, N > cap in ceil(N / cap), every request's first token in arrival order."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gridserve.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator
from gridserve.messages import BatchTokenIDOutput, TokenizedGenerateReq
from gridserve.model_loader.loader import load_model_config
from gridserve.sampling.sampling_params import SamplingParams
from gridserve.scheduler.kv_manager import KVManager
from gridserve.scheduler.schedule_batch import Req
from gridserve.scheduler.schedule_policy import PrefillAdder, admit, reserved_decode_tokens
from gridserve.scheduler.scheduler import Scheduler
from gridserve.server_args import ServerArgs
from tests.tiny_models import make_tiny_model


@settings(max_examples=300, deadline=None, derandomize=True)
@given(prompts=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 40)), min_size=0, max_size=30),
       budget=st.integers(1, 400), slots=st.integers(1, 12), kv_size=st.integers(64, 600),
       running=st.integers(0, 3), ratio=st.sampled_from([0.05, 0.4, 1.0]))
def test_fcfs_admits_the_longest_prefix_that_fits_and_respects_every_bound(prompts, budget, slots, kv_size,
                                                                           running, ratio):
    pool = ReqToTokenPool(slots + running, 128)
    kv = KVManager(pool, TokenToKVPoolAllocator(kv_size), use_radix_cache=False)
    in_flight = []
    for i in range(running):  # requests already decoding, holding a row and some KV
        r = Req(f"run{i}", [1] * 8, SamplingParams(max_new_tokens=20), 0)
        kv.attach(r)
        r.kv_len = 8
        pool.req_to_token[r.req_pool_idx, :8] = kv.allocator.alloc(8).to(torch.int32)
        in_flight.append(r)
    waiting = [Req(f"w{i}", list(range(1, n + 1)), SamplingParams(max_new_tokens=m), 0)
               for i, (n, m) in enumerate(prompts)]
    queue = list(waiting)
    adder = PrefillAdder(kv, in_flight, budget, slots + running, ratio)
    available = kv.available()
    got = admit(adder, queue)

    assert queue == waiting  # admission never edits the queue it reads
    assert got == waiting[:len(got)]  # FCFS: a prefix of arrival order
    assert len(got) <= slots and len({id(r) for r in got}) == len(got)
    assert sum(r.extend_len for r in got) <= budget
    chunked = [r for r in got if r.extend_len < len(r.fill_ids)]
    assert chunked in ([], got[-1:])  # at most one request is split, and it is the last one taken
    if got and (running or len(got) > 1):  # KV for the prompts and the decode room kept for everyone (ratio-scaled)
        future = reserved_decode_tokens(in_flight + got, ratio)
        assert sum(r.extend_len for r in got) + future <= available + len(got)  # int() rounds each request down
    if len(got) < len(waiting):  # the next one in line did not fit: say which bound stopped it
        nxt = waiting[len(got)]
        taken = sum(r.extend_len for r in got)
        reserved = reserved_decode_tokens(in_flight, ratio) + sum(int(_future(r, ratio)) for r in got)
        room = available - reserved - taken
        extend = len(nxt.fill_ids)
        # it fits if its prompt and decode room do; alone (nothing else in flight), if its first chunk does
        fits = extend + _future(nxt, ratio) <= room or (not got and not running and min(extend, budget) <= room)
        assert len(got) == slots or taken >= budget or chunked or not fits, (len(got), room, extend)


def _future(req: Req, ratio: float) -> float:
    return min(req.params.max_new_tokens, 4096) * ratio


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", path)
    args = ServerArgs(model_path=str(path), dtype="float32", device="cpu", max_total_tokens=4096,
                      max_running_requests=16, show_progress=False)
    outputs: list = []
    sched = Scheduler(args, str(path), load_model_config(str(path)), None, recv=lambda timeout_ms: [],
                      send=outputs.append)
    return sched, outputs


@pytest.mark.parametrize("n", [12, 16, 40])
def test_a_burst_takes_ceil_n_over_cap_prefill_steps_in_arrival_order(scheduler, n):
    sched, outputs = scheduler
    outputs.clear()
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    burst = [TokenizedGenerateReq(f"r{i}", [5 + i % 50, 7, 9, 11 + i % 7], params, i) for i in range(n)]
    sched.process_input_requests(burst)  # all have arrived before the first step
    steps = []
    while sched.waiting or sched.running:
        sched.run_step()
        done = [rid for o in outputs if isinstance(o, BatchTokenIDOutput) for rid, f in
                zip(o.reqs.rids, o.reqs.finished_reasons, strict=True) if f is not None]
        outputs.clear()
        steps.append(done)
        assert len(steps) <= n, "admission stalls"
    cap = sched.runner.max_running_requests
    assert len(steps) == math.ceil(n / cap)  # one-token requests finish in the step that admits them
    assert [rid for step in steps for rid in step] == [f"r{i}" for i in range(n)]


def test_a_full_queue_refuses_at_once_and_holds_nothing(tmp_path):
    make_tiny_model("llama", tmp_path)
    args = ServerArgs(model_path=str(tmp_path), dtype="float32", device="cpu", max_total_tokens=1024,
                      max_running_requests=4, max_queued_requests=3, show_progress=False)
    outputs: list = []
    sched = Scheduler(args, str(tmp_path), load_model_config(str(tmp_path)), None, recv=lambda timeout_ms: [],
                      send=outputs.append)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    sched.process_input_requests([TokenizedGenerateReq(f"r{i}", [5, 6, 7], params, i) for i in range(5)])
    refused = {rid: f for o in outputs for rid, f in zip(o.reqs.rids, o.reqs.finished_reasons, strict=True)}
    assert [r.rid for r in sched.waiting] == ["r0", "r1", "r2"]  # the first three wait, in order
    assert set(refused) == {"r3", "r4"} and all(f["status_code"] == 503 and "--max-queued-requests" in f["message"]
                                                for f in refused.values())
    assert sched.stats().num_queue_full == 2
    while sched.waiting or sched.running:
        sched.run_step()
    assert sched.kv.req_pool.available_size() == 4  # the refused ones never took a row


def _run_to_end(sched, outputs, prompts, late_prompts, params, late_priority) -> tuple[list[str], dict]:
    """Queues `prompts` (priority 0), runs two steps, queues `late_prompts` at `late_priority`, then runs to the
    end; returns the order in which requests finished and each one's tokens."""
    outputs.clear()
    sched.process_input_requests([TokenizedGenerateReq(f"low{i}", p, params, i, priority=0)
                                  for i, p in enumerate(prompts)])
    for _ in range(2):
        sched.run_step()
    sched.process_input_requests([TokenizedGenerateReq(f"high{i}", p, params, 100 + i, priority=late_priority)
                                  for i, p in enumerate(late_prompts)])
    for _ in range(500):
        if not (sched.waiting or sched.running):
            break
        sched.run_step()
    order, tokens = [], {}
    for o in outputs:
        for rid, new, f in zip(o.reqs.rids, o.reqs.new_token_ids, o.reqs.finished_reasons, strict=True):
            tokens[rid] = tokens.get(rid, []) + list(new)
            if f is not None:
                order.append(rid)
    return order, tokens


def _with_and_without_priority(path, max_total_tokens: int, max_running: int, prompts, late, params) -> dict:
    """{enabled: (finish order, tokens, scheduler)} of the same run with --enable-priority-scheduling off and on."""
    make_tiny_model("llama", path)
    runs = {}
    for enabled in (False, True):
        args = ServerArgs(model_path=str(path), dtype="float32", device="cpu", max_total_tokens=max_total_tokens,
                          max_running_requests=max_running, show_progress=False, enable_priority_scheduling=enabled)
        outputs: list = []
        sched = Scheduler(args, str(path), load_model_config(str(path)), None, recv=lambda timeout_ms: [],
                          send=outputs.append)
        runs[enabled] = (*_run_to_end(sched, outputs, prompts, late, params, late_priority=100), sched)
    return runs


def test_priority_scheduling_serves_high_priority_first_and_preempts_without_changing_outputs(tmp_path):
    runs = _with_and_without_priority(tmp_path, 2048, 4, [[5 + i, 7, 9 + i % 5] for i in range(24)],
                                      [[50 + i, 60, 70] for i in range(4)],
                                      SamplingParams(max_new_tokens=6, ignore_eos=True))
    off_order, off_tokens, _ = runs[False]
    on_order, on_tokens, sched = runs[True]
    assert sorted(off_order[-4:]) == [f"high{i}" for i in range(4)]  # ignored: they arrived last, finish last
    assert sorted(on_order[:4]) == [f"high{i}" for i in range(4)]  # first to finish, ahead of the running ones
    assert sched.get_internal_state()["num_preempted"] == 4  # the four running low ones gave way
    assert on_tokens == off_tokens  # preempted requests are recomputed to the same greedy tokens
    assert on_order[4:8] == ["low0", "low1", "low2", "low3"]  # and keep their place ahead of later arrivals


def test_a_high_priority_request_preempts_when_kv_memory_runs_out_with_slots_free(tmp_path):
    """16 slots, but KV memory for about three of these requests: the late high-priority one is held back by
    memory, not by slots, and preemption frees the memory for it."""
    runs = _with_and_without_priority(tmp_path, 160, 16, [[5 + i, 7, 9 + i % 5] for i in range(8)], [[50, 60, 70]],
                                      SamplingParams(max_new_tokens=40, ignore_eos=True))
    off_order, off_tokens, off_sched = runs[False]
    on_order, on_tokens, on_sched = runs[True]
    assert off_order[-1] == "high0" and off_sched.num_preempted == 0  # without the flag: last, nobody preempted
    assert on_sched.num_preempted >= 1 and on_order.index("high0") <= 3  # ahead of at least four earlier ones
    assert on_tokens == off_tokens


def test_an_engine_batch_reaches_the_scheduler_whole_and_takes_ceil_n_over_cap_steps(tmp_path):
    """Through the Engine (real processes and sockets): the batch leaves the TokenizerManager as one message, so
    however fast the steps run, the first one sees every request and the burst takes ceil(N / cap) steps."""
    from gridserve.entrypoints.engine import Engine
    from tests.tiny_models import qwen_tokenizer_dir

    make_tiny_model("llama", tmp_path)
    with Engine(model_path=str(tmp_path), tokenizer_path=qwen_tokenizer_dir(), dtype="float32",
                max_running_requests=64, max_total_tokens=8192, show_progress=False, log_level="warning") as e:
        def steps() -> int:
            return e.get_server_info()["internal_states"][0]["prefill_batches_total"]

        before = steps()
        outs = e.generate(input_ids=[[5 + i % 100, 7, 9] for i in range(300)],
                          sampling_params={"max_new_tokens": 1, "ignore_eos": True})
        assert len(outs) == 300 and all(o["meta_info"]["completion_tokens"] == 1 for o in outs)
        assert steps() - before == math.ceil(300 / 64)


@pytest.mark.parametrize("pending", [(1, 1, 1), (1, 0, 1), (0, 0, 0)])
def test_the_model_inputs_resolve_tokens_still_on_the_device(pending):
    """A request whose newest token is still on the device (the overlap loop) has a placeholder id that the
    batch's inputs take from the previous step's tokens; the others keep their own; req_to_token gets the slots."""
    from gridserve.forward_batch import ForwardMode
    from gridserve.scheduler.schedule_batch import ScheduleBatch

    prev_tokens = torch.tensor([70, 71, 72, 73])
    reqs = []
    for i, p in enumerate(pending):
        r = Req(f"r{i}", [5 + i, 6, 7], SamplingParams(max_new_tokens=9), 0)
        r.output_ids, r.pending, r.last_row = [40 + i], p, 3 - i
        r.req_pool_idx, r.kv_len, r.extend_len = i + 1, r.num_tokens - 1, 1
        reqs.append(r)
    table = torch.zeros(4, 8, dtype=torch.int32)
    batch = ScheduleBatch(reqs, ForwardMode.DECODE)
    fb = batch.to_forward_batch(table, torch.tensor([11, 12, 13]), torch.device("cpu"), prev_tokens)
    assert fb.input_ids.tolist() == [73 - i if p else 40 + i for i, p in enumerate(pending)]
    assert fb.positions.tolist() == [r.kv_len for r in reqs]
    assert [table[i + 1, r.kv_len].item() for i, r in enumerate(reqs)] == [11, 12, 13]


@settings(max_examples=200, deadline=None)
@given(prompt=st.integers(1, 12), out=st.integers(0, 12), pending=st.booleans(), data=st.data())
def test_token_ids_are_the_known_tokens_and_the_newest_placeholder(prompt, out, pending, data):
    """token_ids(start, end) slices prompt + output without building it; one past the known tokens is the device
    placeholder of the request's newest token."""
    req = Req("r", list(range(100, 100 + prompt)), SamplingParams(max_new_tokens=64), seed=0)
    req.output_ids = list(range(500, 500 + out))
    req.pending, req.last_row = int(pending), 3
    known = prompt + out
    end = data.draw(st.integers(0, known + int(pending)))
    start = data.draw(st.integers(0, end))
    want = (req.origin_input_ids + req.output_ids)[start:end]
    if end > known:
        want.append(-1 - 3)
    assert req.token_ids(start, end) == want


def test_a_full_cache_evicts_a_slice_of_the_pool_at_once_least_recently_used_first():
    """With the cache full, one slot more evicts 1/EVICT_SLACK of the pool (here four 4-token prompts, not the one
    that one slot needs), so the next steps need no eviction (each walks the whole tree); oldest first."""
    from gridserve.scheduler.kv_manager import EVICT_SLACK

    size = 16 * EVICT_SLACK
    kv = KVManager(ReqToTokenPool(4, 64), TokenToKVPoolAllocator(size), use_radix_cache=True)
    prompts = [[k, k + 1, k + 2, k + 3] for k in range(0, size, 4)]
    for ids in prompts:  # fill the pool with cached prompts
        slots = kv.alloc(len(ids))
        kv.allocator.free(slots[: kv.tree.insert(ids, slots)])
    assert kv.allocator.available_size() == 0 and kv.tree.evictable_size() == size
    kv.alloc(1)
    assert kv.num_evicted_tokens == 16
    assert [kv.tree.match_len(p) for p in prompts[:5]] == [0, 0, 0, 0, 4] and kv.tree.match_len(prompts[-1]) == 4
    for _ in range(15):  # the rest of the slice: no further eviction
        kv.alloc(1)
    assert kv.num_evicted_tokens == 16
    kv.alloc(1)
    assert kv.num_evicted_tokens == 32
