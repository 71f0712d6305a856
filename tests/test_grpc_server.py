"""The gRPC front end over a real Engine's TokenizerManager (embedded SmolLM2-135M), through a real client
channel: greedy outputs equal the Engine's, streamed or not; chat, logprobs and stop tokens; Health and
ModelInfo; bad requests are INVALID_ARGUMENT naming the field; a cancelled or aborted stream frees its KV."""

import asyncio
import contextlib
import dataclasses
import threading
import time

import grpc
import pytest

from gridserve.entrypoints.engine import Engine
from gridserve.entrypoints.grpc import gridserve_pb2 as pb
from gridserve.entrypoints.grpc import gridserve_pb2_grpc as pb_grpc
from gridserve.entrypoints.grpc.grpc_server import serve_grpc_forever
from gridserve.entrypoints.request_flow import max_prompt_chars
from gridserve.messages import AbortReq
from tests.server_utils import free_port, longest_stall

PROMPT = "The history of the printing press"
MAX_NEW = 8
GREEDY = {"temperature": 0, "max_new_tokens": MAX_NEW}


@contextlib.contextmanager
def grpc_server_thread(tm, server_args):
    """serve_grpc_forever on its own event loop in a thread, as it would run in the server; yields a ready
    channel to it."""
    port, stop = free_port(), threading.Event()

    async def main() -> None:
        task = asyncio.create_task(serve_grpc_forever(tm, server_args, "127.0.0.1", port, grace=1))
        while not stop.is_set() and not task.done():
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            yield channel
    finally:
        stop.set()
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def served():
    """(engine, stub) over a gRPC server in a thread of this process."""
    engine = Engine(model_path=None, max_total_tokens=4096, show_progress=False, log_level="warning")
    with grpc_server_thread(engine.tokenizer_manager, engine.server_args) as channel:
        yield engine, pb_grpc.GenerationStub(channel)
    engine.shutdown()


@pytest.fixture(scope="module")
def ref(served) -> dict:
    """The Engine's greedy output for PROMPT."""
    return served[0].generate(prompt=PROMPT, sampling_params=GREEDY)


def _request(stream: bool = True, **kwargs) -> pb.GenerateRequest:
    params = pb.SamplingParams(**{**GREEDY, **kwargs.pop("params", {})})
    return pb.GenerateRequest(sampling_params=params, stream=stream, **kwargs)


def _check_like_engine(responses: list, ref: dict) -> None:
    assert [t for r in responses for t in r.token_ids] == ref["output_ids"]
    assert "".join(r.text for r in responses) == ref["text"]
    assert len({r.id for r in responses}) == 1
    assert [r.HasField("finish_reason") for r in responses] == [False] * (len(responses) - 1) + [True]
    last, meta = responses[-1], ref["meta_info"]
    assert last.finish_reason.type == meta["finish_reason"]["type"]
    assert (last.prompt_tokens, last.completion_tokens) == (meta["prompt_tokens"], len(ref["output_ids"]))


def _used_tokens(engine) -> int:
    return asyncio.run(engine.tokenizer_manager.get_internal_state())[0]["used_tokens"]


def _wait_idle(engine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _used_tokens(engine) != 0 or engine.tokenizer_manager.rid_to_state:
        assert time.monotonic() < deadline, "the request's KV was not freed"
        time.sleep(0.05)


def test_greedy_matches_engine_streamed_and_not(served, ref):
    engine, stub = served
    streamed = list(stub.Generate(_request(text=PROMPT), timeout=60))
    assert len(streamed) > 1
    _check_like_engine(streamed, ref)
    ids = engine.tokenizer.encode(PROMPT)
    [single] = list(stub.Generate(_request(stream=False, input_ids=pb.TokenIds(ids=ids)), timeout=60))
    _check_like_engine([single], ref)
    assert single.cached_tokens > 0  # the same prompt again: a radix cache hit


def test_chat_messages(served):
    engine, stub = served
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ref = engine.generate(prompt=engine.apply_chat_template(messages), sampling_params=GREEDY)
    chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in messages])
    _check_like_engine(list(stub.Generate(_request(messages=chat), timeout=60)), ref)


def test_logprobs_and_stop_token(served, ref):
    stub, ref = served[1], ref["output_ids"]
    responses = list(stub.Generate(_request(text=PROMPT, return_logprob=True, top_logprobs_num=2), timeout=60))
    logprobs = [lp for r in responses for lp in r.logprobs]
    assert [lp.token_id for lp in logprobs] == ref
    for lp in logprobs:  # greedy: the chosen token is the most likely one
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 2
        assert lp.top_logprobs[0].token_id == lp.token_id and lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)
    stop_tok = ref[2]
    [r] = list(stub.Generate(_request(stream=False, text=PROMPT, params={"stop_token_ids": [stop_tok]}), timeout=60))
    assert list(r.token_ids) == ref[: ref.index(stop_tok) + 1]
    assert (r.finish_reason.type, r.finish_reason.matched_token_id) == ("stop", stop_tok)


def test_health_and_model_info(served):
    engine, stub = served
    assert stub.Health(pb.HealthRequest(), timeout=10).ok
    info, tm = stub.ModelInfo(pb.ModelInfoRequest(), timeout=10), engine.tokenizer_manager
    assert info.served_model_name == str(tm.served_model_name)
    assert info.context_length == tm.info["context_len"] > 0
    assert info.max_total_num_tokens == tm.info["max_total_num_tokens"] > 0
    assert info.max_req_input_len == tm.info["max_req_input_len"]
    assert info.vocab_size == tm.vocab_size == 49152
    assert list(info.eos_token_ids) == [engine.tokenizer.eos_token_id]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"text": PROMPT, "params": {"temperature": -1.0}}, "temperature"),
    ({"text": PROMPT, "params": {"temperature": float("nan")}}, "temperature"),
    ({"text": PROMPT, "params": {"top_p": 0.0}}, "top_p"),
    ({"text": PROMPT, "params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"text": PROMPT, "params": {"max_new_tokens": 100_000}}, "max_new_tokens"),  # too long
    ({"input_ids": pb.TokenIds(ids=[1] * 5000)}, "prompt"),  # more ids than the server accepts, as HTTP says
    ({"text": ""}, "prompt"),
    ({"text": "a" * 1_400_000}, "prompt"),  # more characters than 4,096 tokens can hold: refused untokenized
    ({}, "input"),
    ({"input_ids": pb.TokenIds(ids=[1, 10**6])}, "input_ids"),
    ({"input_ids": pb.TokenIds(ids=[1, -2])}, "input_ids"),
    ({"messages": pb.ChatMessages()}, "messages"),
    ({"text": PROMPT, "top_logprobs_num": -1}, "top_logprobs_num"),
])
def test_bad_requests_are_invalid_argument(served, kwargs, field):
    engine, stub = served
    for stream in (True, False):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(_request(stream=stream, **kwargs), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}:"), err.value.details()
    # the server still serves
    [r] = list(stub.Generate(_request(stream=False, text=PROMPT, params={"max_new_tokens": 1}), timeout=30))
    assert len(r.token_ids) == 1 and r.finish_reason.type == "length"


def test_a_huge_prompt_does_not_stall_other_rpcs(served):
    """A multi-megabyte text is tokenized off the event loop: Health keeps answering meanwhile (the whole process
    counts: probes that could not even start count too), and the prompt is then refused as too long."""
    engine, stub = served
    unit = "漢字かな交じり文 "  # ~1.7 tokens a character: a slow text to tokenize, 3.7 MB in UTF-8 here
    text = unit * (max_prompt_chars(engine.tokenizer_manager) // len(unit))
    result: dict = {}

    def big() -> None:
        start = time.monotonic()
        try:
            list(stub.Generate(_request(stream=False, text=text), timeout=120))
        except grpc.RpcError as e:
            result["code"], result["details"] = e.code(), e.details()
        result["seconds"] = time.monotonic() - start

    t = threading.Thread(target=big)
    t.start()
    worst = longest_stall(t, lambda: stub.Health(pb.HealthRequest(), timeout=10))
    t.join()
    assert result["code"] == grpc.StatusCode.INVALID_ARGUMENT, result
    assert result["seconds"] > 0.5  # the tokenizing took a while: the probes above ran during it
    assert worst < 0.5, worst


def test_dead_scheduler_is_unavailable(served):
    engine, stub = served
    tm = engine.tokenizer_manager
    tm.dead_reason = "scheduler failed: test"
    try:
        for call in (lambda: stub.Health(pb.HealthRequest(), timeout=10),
                     lambda: list(stub.Generate(_request(text=PROMPT), timeout=10))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "scheduler failed: test" in err.value.details()
    finally:
        tm.dead_reason = None
    assert stub.Health(pb.HealthRequest(), timeout=10).ok


def _long_stream(stub):
    """A stream that would run for a long while, once its first few responses have arrived."""
    call = stub.Generate(_request(text=PROMPT, params={"max_new_tokens": 1000, "ignore_eos": True}), timeout=120)
    first = [next(call) for _ in range(3)]
    return call, first


def test_client_cancel_aborts_the_request(served):
    engine, stub = served
    call, _ = _long_stream(stub)
    assert _used_tokens(engine) > 0  # it is running
    call.cancel()
    _wait_idle(engine)
    assert stub.Health(pb.HealthRequest(), timeout=10).ok


def test_abort_ends_the_stream_with_aborted(served):
    engine, stub = served
    call, first = _long_stream(stub)
    engine.tokenizer_manager.send(AbortReq(first[0].id))  # as an abort from another front end would
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.ABORTED
    _wait_idle(engine)


def test_api_key_is_checked_on_every_rpc_but_health(served, ref):
    """--grpc-mode --api-key: Generate and ModelInfo need `authorization: Bearer <key>`; Health does not."""
    engine, _ = served
    tm = engine.tokenizer_manager
    args = dataclasses.replace(engine.server_args, api_key="s3cret")
    with grpc_server_thread(tm, args) as channel:
        stub = pb_grpc.GenerationStub(channel)
        assert stub.Health(pb.HealthRequest(), timeout=10).ok
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(_request(text=PROMPT), timeout=10, metadata=metadata))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfo(pb.ModelInfoRequest(), timeout=10, metadata=metadata)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = [("authorization", "Bearer s3cret")]
        _check_like_engine(list(stub.Generate(_request(text=PROMPT), timeout=60, metadata=ok)), ref)
        assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=10, metadata=ok).vocab_size == tm.vocab_size


def test_priority_is_carried_and_refused_when_the_server_says_so(served, ref):
    engine, stub = served
    [r] = list(stub.Generate(_request(stream=False, text=PROMPT, priority=7), timeout=30))
    assert list(r.token_ids) == ref["output_ids"]  # accepted; without priority scheduling it changes nothing
    tm = engine.tokenizer_manager
    tm.abort_on_priority = True  # what --abort-on-priority-when-disabled sets
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(_request(stream=False, text=PROMPT, priority=7), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("priority:") and "--enable-priority-scheduling" in err.value.details()
    finally:
        tm.abort_on_priority = False
