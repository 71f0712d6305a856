"""The TokenizerManager on its own, over a real ZMQ socket: a request whose message cannot be sent ends with an
error instead of waiting forever, and choice seeds stay within 64 bits."""

import asyncio

import pytest
import zmq

from gridserve.managers.tokenizer_manager import TokenizerManager
from gridserve.sampling.sampling_params import SamplingParams

INFO = {"context_len": 64, "max_total_num_tokens": 256}


def test_a_request_that_cannot_be_sent_fails_instead_of_hanging():
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.close()  # every send on it raises, as a message that cannot be encoded does
    tm = TokenizerManager(None, INFO, 100, push.send_pyobj, "tiny")

    async def run():
        [req] = tm.make_requests([1, 2, 3], SamplingParams(max_new_tokens=2))
        return [out async for out in tm.generate(req)]

    try:
        outs = asyncio.run(asyncio.wait_for(run(), 10))
    finally:
        tm.close()
        ctx.term()
    reason = outs[-1]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "could not be sent to the scheduler" in reason["message"]
    assert tm.rid_to_state == {}


@pytest.mark.parametrize("seed", [2**64 - 1, 2**63])
def test_choice_seeds_wrap_within_64_bits(seed):
    tm = TokenizerManager(None, INFO, 100, lambda msg: None, "tiny")
    try:
        reqs = tm.make_requests([1, 2], SamplingParams(max_new_tokens=2, n=3, seed=seed))
    finally:
        tm.close()
    seeds = [r.seed for r in reqs]
    assert all(0 <= s < 2**64 for s in seeds) and len(set(seeds)) == 3
