"""Greedy output of the embedded SmolLM2 equals transformers' generate, token for token: prompts alone and
batched, with and without the radix cache, with chunked prefill, and with a KV pool so small that requests
are retracted and recomputed (also with two pipeline stages)."""

import pytest

from gridserve.entrypoints.engine import Engine
from tests.smollm import MAX_NEW, QUESTIONS, assert_no_leak, hf_greedy, load_hf_model

GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW}


@pytest.fixture(scope="module")
def prompts_and_reference():
    engine = Engine(max_total_tokens=2048, show_progress=False, log_level="warning")
    prompts = [engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    prompts.append("The history of the printing press")  # a raw prompt too
    ids = [engine.tokenizer.encode(p) for p in prompts]
    hf = load_hf_model()
    ref = [hf_greedy(hf, i) for i in ids]
    yield engine, ids, ref
    engine.shutdown()


def _check(outs, ref):
    for got, want in zip(outs, ref, strict=True):
        assert got["output_ids"] == want
        reason = got["meta_info"]["finish_reason"]
        assert reason["type"] == ("stop" if len(want) < MAX_NEW else "length")


def test_alone_and_batched_match_transformers(prompts_and_reference):
    engine, ids, ref = prompts_and_reference
    _check([engine.generate(input_ids=i, sampling_params=GREEDY) for i in ids], ref)
    outs = engine.generate(input_ids=ids, sampling_params=GREEDY)
    _check(outs, ref)
    # the second run shares the chat template's system prompt through the radix cache
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in outs[:-1])
    assert outs[0]["text"] == engine.tokenizer.decode(ref[0], skip_special_tokens=True)
    assert_no_leak(engine)


@pytest.mark.parametrize("server_args", [
    {"chunked_prefill_size": 16, "schedule_policy": "lpm"},
    # 7 requests need ~500 slots; optimistic admission (little room kept for future tokens) makes decode retract.
    # With the radix cache they share the chat template's ~30-token system prompt, so their pool is smaller still.
    {"max_total_tokens": 150, "schedule_conservativeness": 0.05},
    {"max_total_tokens": 200, "schedule_conservativeness": 0.05, "disable_radix_cache": True,
     "chunked_prefill_size": 32},
    # the overlap loop (the default on CUDA) runs one step ahead of the host: same tokens, same retractions
    {"enable_overlap_schedule": True, "chunked_prefill_size": 16, "schedule_policy": "lpm"},
    {"enable_overlap_schedule": True, "max_total_tokens": 150, "schedule_conservativeness": 0.05},
    {"enable_overlap_schedule": True, "max_total_tokens": 200, "schedule_conservativeness": 0.05,
     "disable_radix_cache": True, "chunked_prefill_size": 32},
    # two pipeline stages: requests are retracted while other micro-batches are in flight
    {"pp_size": 2, "max_total_tokens": 150, "schedule_conservativeness": 0.05},
], ids=["chunked-lpm", "tiny-pool", "tiny-pool-no-radix-chunked", "overlap-chunked-lpm", "overlap-tiny-pool",
        "overlap-tiny-pool-no-radix-chunked", "pp2-tiny-pool"])
def test_engine_configs_match_transformers(prompts_and_reference, server_args):
    _, ids, ref = prompts_and_reference
    args = {"max_total_tokens": 2048, **server_args}
    with Engine(show_progress=False, log_level="warning", **args) as engine:
        for _ in range(2):  # the second round runs on a warm (and, with a tiny pool, evicted) cache
            _check(engine.generate(input_ids=ids, sampling_params=GREEDY), ref)
            state = assert_no_leak(engine)
        if args["max_total_tokens"] < 500:
            assert state["num_retracted"] > 0
            if not args.get("disable_radix_cache"):
                assert state["num_evicted_tokens"] > 0
