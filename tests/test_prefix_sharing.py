"""Requests that share a prompt prefix share its KV, through a real scheduler (a tiny model, in-process): a prompt
is in the prefix cache as soon as its prefill is launched, not when its request finishes, and requests of one group
that arrive together compute their shared prefix once (the others wait a step, then find it cached). A property
over random queues bounds when a request may be passed over."""

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gridserve.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator
from gridserve.messages import BatchTokenIDOutput, TokenizedGenerateReq
from gridserve.model_loader.loader import load_model_config
from gridserve.sampling.sampling_params import SamplingParams
from gridserve.scheduler.kv_manager import KVManager
from gridserve.scheduler.schedule_batch import Req
from gridserve.scheduler.schedule_policy import IN_BATCH_SHARED_MIN, PrefillAdder, admit
from gridserve.scheduler.scheduler import Scheduler
from gridserve.server_args import ServerArgs
from tests.tiny_models import make_tiny_model

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)
SHARED = list(range(10, 10 + 2 * IN_BATCH_SHARED_MIN))  # a "system prompt" of 64 tokens (the vocabulary is 211)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", path)
    return str(path)


def _scheduler(path: str, **kw) -> tuple[Scheduler, list]:
    args = ServerArgs(model_path=path, dtype="float32", device="cpu", max_total_tokens=4096, max_running_requests=16,
                      show_progress=False, **kw)
    outputs: list = []
    sched = Scheduler(args, path, load_model_config(path), None, recv=lambda timeout_ms: [], send=outputs.append)
    return sched, outputs


def _run(sched: Scheduler, outputs: list, reqs: list[TokenizedGenerateReq]) -> tuple[list[set[str]], dict]:
    """Queues reqs, runs to the end; returns the rids admitted at each step and each request's cached tokens."""
    sched.process_input_requests(reqs)
    admitted, cached = [], {}
    for _ in range(100):
        if not (sched.waiting or sched.running):
            break
        before = {r.rid for r in sched.waiting}
        sched.run_step()
        admitted.append(before - {r.rid for r in sched.waiting})
    for o in outputs:
        if isinstance(o, BatchTokenIDOutput):
            cached.update(zip(o.reqs.rids, o.reqs.cached_tokens, strict=True))
    outputs.clear()
    return [a for a in admitted if a], cached


def _req(rid: str, ids: list[int]) -> TokenizedGenerateReq:
    return TokenizedGenerateReq(rid, ids, PARAMS, 0)


def test_a_group_arriving_together_computes_its_prefix_once(model_path):
    group = [_req(f"g{i}", SHARED + [200 + i, 7, 8]) for i in range(4)]
    other = _req("other", [100 + i for i in range(40)])
    sched, outputs = _scheduler(model_path)
    steps, cached = _run(sched, outputs, [*group, other])
    # the first of the group and the unrelated request go first; the rest of the group waits one step
    assert steps[:2] == [{"g0", "other"}, {"g1", "g2", "g3"}]
    assert cached == {"g0": 0, "other": 0, "g1": len(SHARED), "g2": len(SHARED), "g3": len(SHARED)}

    sched, outputs = _scheduler(model_path, disable_radix_cache=True)  # nothing to wait for without the cache
    steps, cached = _run(sched, outputs, [*group, other])
    assert steps[0] == {"g0", "g1", "g2", "g3", "other"} and set(cached.values()) == {0}


def test_requests_sharing_only_a_little_of_their_prompt_do_not_wait(model_path):
    # 40 shared tokens, but each has 200 of its own: waiting would save a fifth of its work for a step's delay
    reqs = [_req(f"r{i}", SHARED[:40] + [(50 * i + j) % 200 + 1 for j in range(200)]) for i in range(3)]
    sched, outputs = _scheduler(model_path)
    steps, _ = _run(sched, outputs, reqs)
    assert steps[0] == {"r0", "r1", "r2"}


def test_a_prompt_is_cached_while_its_request_still_decodes(model_path):
    sched, outputs = _scheduler(model_path)
    sched.process_input_requests([_req("first", SHARED)])
    sched.run_step()
    sched.run_step()
    assert [r.rid for r in sched.running] == ["first"]  # prefilled, decoding, far from done
    steps, cached = _run(sched, outputs, [_req("later", SHARED + [5, 6])])
    assert cached["later"] == len(SHARED)
    assert sched.kv.req_pool.available_size() == sched.kv.req_pool.size  # every row given back


@settings(max_examples=200, deadline=None, derandomize=True)
@given(prompts=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0, 20, 40, 64, 64, 64]), st.integers(1, 90)),
                        min_size=1, max_size=14),
       cached=st.sets(st.integers(0, 3)), budget=st.integers(16, 800))
def test_a_request_waits_only_for_a_batch_member_computing_most_of_its_prompt(prompts, cached, budget):
    """Admission over random prompts made of one of four 64-token prefixes (some already cached), a shared part of
    it, and a tail of their own: a request is passed over only if a request admitted before it in this batch
    computes at least IN_BATCH_SHARED_MIN of its uncached tokens and at least half of them; the batch otherwise
    is what FCFS takes, and nothing is admitted twice."""
    kv = KVManager(ReqToTokenPool(16, 512), TokenToKVPoolAllocator(4096), use_radix_cache=True)
    heads = [[100 + 70 * g + i for i in range(64)] for g in range(4)]
    for g in cached:  # a finished request left this prefix in the cache
        r = Req(f"old{g}", heads[g] + [1], SamplingParams(max_new_tokens=1), 0)
        kv.attach(r)
        r.kv_len = 65
        kv.req_pool.req_to_token[r.req_pool_idx, :65] = kv.alloc(65).to(torch.int32)
        kv.release(r)
    waiting = [Req(f"w{i}", heads[g][:shared] + [(7 * i + j) % 97 + 1 for j in range(tail)],
                   SamplingParams(max_new_tokens=4), 0) for i, (g, shared, tail) in enumerate(prompts)]
    adder = PrefillAdder(kv, [], budget, 16, 0.5)
    got = admit(adder, waiting)
    assert len({id(r) for r in got}) == len(got) and sum(r.extend_len for r in got) <= budget
    taken = set(map(id, got))
    earlier = [[o for o in got if waiting.index(o) < i] for i in range(len(waiting))]
    waited = [id(r) not in taken and _helped(r, earlier[i], kv) for i, r in enumerate(waiting)]
    stop = next((i for i, r in enumerate(waiting) if id(r) not in taken and not waited[i]), len(waiting))
    event(f"waited: {sum(waited) > 0}")
    assert all(id(r) in taken or waited[i] for i, r in enumerate(waiting[:stop]))  # the passed-over ones waited
    assert not any(id(r) in taken for r in waiting[stop + 1 :])  # FCFS stops at the first that did not fit


def _helped(req, earlier, kv) -> bool:
    """Whether one of `earlier` (admitted before req) computes >= IN_BATCH_SHARED_MIN tokens that req would
    compute, and at least half of them."""
    ids = req.fill_ids
    cached = kv.tree.match_len(ids[:-1])
    for other in earlier:
        n, limit = 0, min(len(ids), len(other.fill_ids), other.kv_len + other.extend_len)
        while n < limit and ids[n] == other.fill_ids[n]:
            n += 1
        gain = n - max(cached, other.kv_len)
        if gain >= IN_BATCH_SHARED_MIN and 2 * gain >= len(ids) - cached:
            return True
    return False
