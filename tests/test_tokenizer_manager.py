"""The TokenizerManager on its own, over a real ZMQ socket: a request whose message cannot be sent ends with an
error instead of waiting forever, and choice seeds stay within 64 bits."""

import asyncio

import pytest
import zmq

from gridserve.managers import tokenizer_manager
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


def _pair():
    """A real PUSH/PULL pair over an inproc endpoint, as the TokenizerManager and the scheduler's IO rank hold."""
    from gridserve.ipc import Channel

    ctx = zmq.Context()
    pull = Channel(ctx, zmq.PULL, "inproc://tm-test")
    push = Channel(ctx, zmq.PUSH, "inproc://tm-test")
    return ctx, pull, push


def test_requests_started_together_leave_as_one_message_in_order():
    """A batch (the Engine's, a prompt list) reaches the scheduler in one receive, so its first step sees all of
    it; the receiving Channel unpacks the list."""
    ctx, pull, push = _pair()
    tm = TokenizerManager(None, INFO, 100, push.send, "tiny")

    async def run():
        reqs = [r for i in range(50) for r in tm.make_requests([1, 2, i], SamplingParams(max_new_tokens=2))]
        tasks = [asyncio.ensure_future(anext(tm.generate(r), None)) for r in reqs]
        await asyncio.sleep(0.2)
        tm.fail_all("test over")  # ends every request so the coroutines finish
        await asyncio.gather(*tasks)
        return reqs

    try:
        reqs = asyncio.run(asyncio.wait_for(run(), 10))
        assert pull.sock.poll(2000)
        first = pull._decode(pull.sock.recv())
        assert [r.rid for r in first] == [r.rid for r in reqs]  # one message, in the order they started
        assert not pull.sock.poll(100)
    finally:
        tm.close()
        ctx.destroy(linger=0)


def test_a_request_abandoned_before_it_left_is_never_sent_nor_aborted():
    ctx, pull, push = _pair()
    tm = TokenizerManager(None, INFO, 100, push.send, "tiny")

    async def run():
        [req] = tm.make_requests([1, 2, 3], SamplingParams(max_new_tokens=2))
        gen = tm.generate(req)
        step = gen.__anext__()
        step.send(None)  # runs to its first wait: the request is queued and the flush scheduled, not yet run
        with pytest.raises(asyncio.CancelledError):  # the consumer is cancelled before the event loop turns
            step.throw(asyncio.CancelledError())
        await asyncio.sleep(0.1)  # the flush runs: nothing is left to send

    try:
        asyncio.run(asyncio.wait_for(run(), 10))
        assert pull.recv_all(300) == []  # neither the request nor an abort for it
        assert tm.rid_to_state == {}
    finally:
        tm.close()
        ctx.destroy(linger=0)


def test_a_channel_unpacks_a_list_and_keeps_single_messages():
    ctx, pull, push = _pair()
    try:
        push.send(["a", "b"])
        push.send("c")
        msgs = []
        for _ in range(50):
            msgs += pull.recv_all(100)
            if len(msgs) == 3:
                break
        assert msgs == ["a", "b", "c"]
    finally:
        ctx.destroy(linger=0)


def test_a_stream_whose_body_never_started_releases_its_request():
    """A streaming route submits its requests and sends them at once, before its response starts
    (request_flow.streamed). If the response closes before its body generator ever ran (the client left at once),
    closing it aborts them, which frees their KV cache."""
    from gridserve.entrypoints.request_flow import generate_all, streamed
    from gridserve.messages import AbortReq

    ctx, pull, push = _pair()
    tm = TokenizerManager(None, INFO, 100, push.send, "tiny")

    async def run():
        [req] = tm.make_requests([1, 2, 3], SamplingParams(max_new_tokens=2))
        response = streamed(tm, [req], generate_all(tm, [req]))
        assert set(tm.rid_to_state) == {req.rid}
        response.on_close()
        await asyncio.sleep(0.1)
        return req

    try:
        req = asyncio.run(asyncio.wait_for(run(), 10))
        msgs = []
        for _ in range(5):
            msgs += pull.recv_all(100)
        assert [m.rid if isinstance(m, AbortReq) else ("req", m.rid) for m in msgs] == [("req", req.rid), req.rid]
        assert tm.rid_to_state == {}
    finally:
        tm.close()
        ctx.destroy(linger=0)


def test_a_request_leaves_from_its_event_loop_unless_an_earlier_message_is_still_queued():
    """send_now sends from the posting thread (no hop to the sender thread, which waited for the GIL until the event
    loop's turn ended: ~0.5 ms of every TTFT on a GPU host). A message that finds the socket unable to take it
    without blocking goes to the sender thread, and every later one follows it there until it has left: the
    order holds. So does a large prompt, not to be encoded on the event loop. Real ZMQ underneath; the wrappers
    only record the thread and hold the blocking send."""
    import threading
    import time

    ctx, pull, push = _pair()
    release, sent_by = threading.Event(), []
    refuse_next = [True]

    def send_now(msg) -> bool:
        if refuse_next[0]:  # as a full socket refuses
            refuse_next[0] = False
            return False
        sent_by.append(("now", threading.current_thread().name))
        return push.try_send(msg)

    def send(msg) -> None:
        release.wait(10)  # the scheduler is slow to take it
        sent_by.append(("queued", threading.current_thread().name))
        push.send(msg)

    tm = TokenizerManager(None, INFO, 100, send, "tiny", send_now=send_now)

    async def submit(n: int) -> list:
        reqs = [tm.make_requests([1, 2, i], SamplingParams(max_new_tokens=2))[0] for i in range(n)]
        for r in reqs:
            tm.submit(r)
            tm.flush()  # each leaves alone
        return reqs

    try:
        first = asyncio.run(submit(3))  # the first is refused; the two after it queue behind it
        assert not pull.sock.poll(200) and sent_by == []
        release.set()
        got = [pull._decode(pull.sock.recv()) for _ in range(3) if pull.sock.poll(2000)]
        assert [m.rid for m in got] == [r.rid for r in first]
        assert [how for how, _ in sent_by] == ["queued"] * 3
        assert {name for _, name in sent_by} == {"gridserve-tm-send"}
        deadline = time.monotonic() + 5
        while tm._outbox.unfinished_tasks and time.monotonic() < deadline:  # counted out after its send returns
            time.sleep(0.01)
        [last] = asyncio.run(submit(1))  # nothing on its way now: it leaves from the event loop's thread
        assert pull.sock.poll(2000) and pull._decode(pull.sock.recv()).rid == last.rid
        assert sent_by[-1] == ("now", threading.main_thread().name)
        with pytest.MonkeyPatch.context() as mp:  # a large prompt is encoded on the sender thread, not the loop
            mp.setattr(tokenizer_manager, "DIRECT_SEND_MAX_TOKENS", 2)
            [big] = asyncio.run(submit(1))  # 3 prompt tokens
            assert pull.sock.poll(2000) and pull._decode(pull.sock.recv()).rid == big.rid
        assert sent_by[-1] == ("queued", "gridserve-tm-send")
    finally:
        tm.close()
        ctx.destroy(linger=0)
