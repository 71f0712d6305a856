"""The HTTP API under a real uvicorn server around a real Engine (the embedded SmolLM2-135M), driven by the
official OpenAI client and httpx: OpenAI and native routes, streaming, errors, disconnects, operator routes."""

import asyncio
import contextlib
import dataclasses
import gc
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from gridserve.entrypoints.engine import Engine
from gridserve.entrypoints.http_server import create_app
from gridserve.entrypoints.request_flow import max_prompt_chars, prepare_requests
from gridserve.sampling.sampling_params import SamplingParams
from tests.server_utils import longest_stall

MAX_TOTAL_TOKENS = 4096
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The history of the printing press"
API_KEY = "sk-test-key"
MODEL = "default"  # the served name works too; see test_chat_matches_engine


@contextlib.contextmanager
def serve(app):
    """Runs `app` under uvicorn on a free localhost port in a background thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, loop="uvloop", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def engine():
    engine = Engine(model_path=None, max_total_tokens=MAX_TOTAL_TOKENS, show_progress=False, log_level="warning")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(engine):
    with serve(create_app(engine.tokenizer_manager, engine.server_args)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client: openai.OpenAI, **kwargs):
    return client.completions.create(model=MODEL, **kwargs)


def chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(model=MODEL, **kwargs)


def greedy(engine, prompt: str, max_new: int, **params) -> dict:
    return engine.generate(prompt, {"temperature": 0, "max_new_tokens": max_new, **params})


def parse_sse(raw: str) -> list[dict]:
    """The JSON events of a raw SSE body, checking its framing: `data: {json}` events, then `data: [DONE]`."""
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    assert events[-1] == "data: [DONE]", events[-3:]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def wait_idle(http: httpx.Client, timeout: float = 20.0) -> dict:
    """Polls /server_info until no request runs and no KV slot is held by one."""
    deadline = time.monotonic() + timeout
    while True:
        state = http.get("/server_info").json()["internal_states"][0]
        if state["num_running"] == 0 and state["num_waiting"] == 0 and state["used_tokens"] == 0:
            return state
        assert time.monotonic() < deadline, f"the server did not free its requests: {state}"
        time.sleep(0.1)


# ---- completions and chat ---------------------------------------------------------------------------------
def test_completion_matches_engine(engine, client):
    want = greedy(engine, PROMPT, 8)
    got = client.completions.create(model="default", prompt=PROMPT, max_tokens=8, temperature=0)
    assert got.object == "text_completion" and got.model == engine.tokenizer_manager.served_model_name
    assert got.choices[0].text == want["text"]
    assert got.choices[0].finish_reason == "length"
    n_prompt = len(engine.tokenizer.encode(PROMPT))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (n_prompt, 8, n_prompt + 8)
    assert got.usage.prompt_tokens_details.cached_tokens >= 0

    chunks = list(complete(client, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == want["text"]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == n_prompt


def test_chat_matches_engine(engine, client):
    prompt = engine.tokenizer_manager.apply_chat_template(QUESTION)
    want = greedy(engine, prompt, 10)
    got = client.chat.completions.create(model=engine.tokenizer_manager.served_model_name, messages=QUESTION,
                                         max_completion_tokens=10, temperature=0)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want["text"]
    assert got.choices[0].finish_reason == ("length" if want["meta_info"]["completion_tokens"] == 10 else "stop")
    assert got.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert got.usage.completion_tokens == want["meta_info"]["completion_tokens"]

    # content given as a list of text parts is the same conversation
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}]
    chunks = list(chat(client, messages=parts, max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == want["text"]
    assert chunks[-2].choices[0].finish_reason == got.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == got.usage.total_tokens


def test_n_with_seed(client):
    args = {"messages": QUESTION, "max_tokens": 8, "temperature": 1.0, "n": 2, "seed": 1234}
    first = chat(client, **args)
    again = chat(client, **args)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in again.choices]  # a seed makes sampling reproducible
    assert texts[0] != texts[1]  # ... while each choice draws its own tokens
    assert first.usage.prompt_tokens == again.usage.prompt_tokens  # the prompt counts once, not per choice
    assert 2 <= first.usage.completion_tokens <= 16

    streamed: dict[int, list[str]] = {0: [], 1: []}
    for chunk in chat(client, **args, stream=True):
        for choice in chunk.choices:
            if choice.delta.role:
                assert streamed[choice.index] == []  # the role opens each choice
            streamed[choice.index].append(choice.delta.content or "")
    assert ["".join(streamed[i]) for i in (0, 1)] == texts


def test_completion_logprobs(engine, client):
    got = complete(client, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3).choices[0]
    lp = got.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == got.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert top[token] == pytest.approx(logprob) and max(top.values()) == pytest.approx(logprob)  # greedy

    chunks = list(complete(client, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, stream=True))
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_chat_logprobs(client):
    got = chat(client, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2).choices[0]
    content = got.logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == got.message.content
    for t in content:
        assert bytes(t.bytes).decode() == t.token and t.logprob <= 0
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token  # greedy: the top one
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob


def test_stop_strings(engine, client):
    full = greedy(engine, PROMPT, 12)["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    want = full[: full.index(stop)]
    got = complete(client, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "never seen"])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    chunks = list(complete(client, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"
    assert got.choices[0].matched_stop == stop and chunks[-1].choices[0].matched_stop == stop  # as SGLang says it
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=200, temperature=0)
    if chat.choices[0].finish_reason == "stop":  # ended by the end-of-turn token: its id
        assert isinstance(chat.choices[0].matched_stop, int)
    length = complete(client, prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    assert length.choices[0].finish_reason == "length" and length.choices[0].matched_stop is None


def test_completion_prompt_forms(engine, client):
    ids = engine.tokenizer.encode(PROMPT)
    want = greedy(engine, PROMPT, 4)["text"]
    for prompt in (ids, [ids]):
        assert complete(client, prompt=prompt, max_tokens=4, temperature=0).choices[0].text == want
    got = complete(client, prompt=[PROMPT, "Once upon a time"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert got.choices[0].text == got.choices[1].text == want  # n per prompt, prompts in order
    assert got.usage.prompt_tokens == len(ids) + len(engine.tokenizer.encode("Once upon a time"))
    # SGLang/vLLM extras pass through to sampling
    extra = {"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0, "ignore_eos": True, "stop_token_ids": [0],
             "skip_special_tokens": True}
    got = complete(client, prompt=PROMPT, max_tokens=4, temperature=0.7, user="u1", extra_body=extra)
    assert got.choices[0].text == want  # top_k=1 is greedy


def test_default_max_tokens(engine):
    """Absent max_tokens, a request gets the room left after its prompt (context and KV cache both)."""
    tm = engine.tokenizer_manager
    room = min(tm.info["context_len"], tm.info["max_total_num_tokens"])
    reqs = prepare_requests(tm, [[1] * 10, [1] * 20], SamplingParams(n=2), None)
    assert [r.sampling_params.max_new_tokens for r in reqs] == [room - 10] * 2 + [room - 20] * 2


# ---- native /generate -------------------------------------------------------------------------------------
def test_generate(engine, http):
    want = greedy(engine, PROMPT, 5)
    params = {"temperature": 0, "max_new_tokens": 5}
    one = http.post("/generate", json={"text": PROMPT, "sampling_params": params}).json()
    assert one["text"] == want["text"] and one["output_ids"] == want["output_ids"]
    assert one["meta_info"]["finish_reason"]["type"] == "length" and "output_token_logprobs" not in one["meta_info"]

    ids = engine.tokenizer.encode(PROMPT)
    batch = http.post("/generate", json={"input_ids": [ids, ids], "sampling_params": params, "return_logprob": True,
                                         "top_logprobs_num": 2, "rid": ["a", "b"]}).json()
    assert [b["output_ids"] for b in batch] == [want["output_ids"]] * 2 and [b["meta_info"]["id"] for b in batch] == [
        "a", "b"]
    assert len(batch[0]["meta_info"]["output_token_logprobs"]) == 5
    assert all(len(top) == 2 for top in batch[0]["meta_info"]["output_top_logprobs"])

    r = http.post("/generate", json={"text": PROMPT, "sampling_params": params, "stream": True})
    events = parse_sse(r.text)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1]["text"] == want["text"] and events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(want["text"].startswith(e["text"]) for e in events)  # cumulative


# ---- concurrency, errors, disconnects ---------------------------------------------------------------------
def test_concurrent_streams(url, engine):
    """32 streaming requests at once all finish, each with well-formed SSE."""

    async def one(client: httpx.AsyncClient, i: int) -> list[dict]:
        if i % 2:
            body = {"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 4, "stream": True}
            path = "/v1/chat/completions"
        else:
            body = {"prompt": f"{i} little pigs", "max_tokens": 4, "stream": True, "temperature": 0}
            path = "/v1/completions"
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            return parse_sse((await r.aread()).decode())

    async def run_all() -> list[list[dict]]:
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run_all())
    assert len(results) == 32
    for events in results:
        finals = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
        assert finals[-1] in ("stop", "length") and all(f is None for f in finals[:-1])
    # the 16 completions are greedy: each equals the engine's own output
    assert "".join(e["choices"][0]["text"] for e in results[2]) == greedy(engine, "2 little pigs", 4)["text"]


LONG_PROMPT = "hello " * (MAX_TOTAL_TOKENS + 100)
VOCAB = 49152  # SmolLM2's (test_bad_inputs_are_bounded checks it)
HUGE_TEXT = "hello " * 2_800_000  # 16.8 MB: more characters than the context can hold, refused without tokenizing
NEST = 100_000  # nesting bombs: 100,000 `[` or `{"a":`
BOMB_LIST = b"[" * NEST + b"1" + b"]" * NEST
BOMB_OBJECT = b'{"a":' * NEST + b"1" + b"}" * NEST


def deep_list(depth: int) -> list:
    """A list nested `depth` levels: deep, but within what the JSON parser takes."""
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


BAD_INPUTS = [
    # (path, json body or raw bytes, status, param[, words the message must contain])
    # (path, json body or raw bytes, status, param)
    ("/v1/completions", b'{"prompt": "x", ', 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": True}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", 1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG_PROMPT}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "default"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": QUESTION, "model": "nope"}, 404, "model"),
    ("/generate", {"sampling_params": {}}, 400, "text"),
    ("/generate", {"text": "x", "sampling_params": {"bogus": 1}}, 400, "bogus"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
    ("/generate", {"text": ["x", "y"], "sampling_params": [{}]}, 400, "sampling_params"),
    ("/generate", {"input_ids": [-1]}, 400, "input_ids"),
    ("/generate", {"text": "x", "stream": "yes"}, 400, "stream"),
    ("/nope", {}, 404, None),
    # lone UTF-16 surrogates in every kind of text field
    ("/v1/completions", {"prompt": "a\ud800b"}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "a\udfffb"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["\ud800"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "model": "m\ud800"}, 400, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, 400, "messages[0].content"),
    ("/generate", {"text": "a\ud800b"}, 400, "text"),
    ("/generate", {"text": "x", "rid": "r\ud800"}, 400, "rid"),
    ("/generate", {"text": "x", "sampling_params": {"stop": "\ud800"}}, 400, "stop"),
    # fan-out and stop-list caps: one request must not cost everyone else
    ("/generate", {"text": "x", "sampling_params": {"n": 20000, "max_new_tokens": 1}}, 400, "n"),
    ("/generate", {"text": ["x"] * 600, "sampling_params": {"n": 2}}, 400, "text"),
    ("/v1/completions", {"prompt": ["x"] * 20000, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["s"] * 5000}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 1000}, 400, "stop"),
    # the body itself: not UTF-8, not JSON, not an object (nothing to name: param is null)
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None, "not valid UTF-8"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xc3"}]}', 400, None, "not valid UTF-8"),
    ("/generate", b'{"text": "\xc0\xaf"}', 400, None, "not valid UTF-8"),  # an overlong encoding of "/"
    ("/v1/completions", json.dumps({"prompt": "x"}).encode("utf-16"), 400, None, "not valid UTF-8"),
    ("/v1/completions", b"", 400, None, "empty"),
    ("/v1/completions", b"hello", 400, None, "not valid JSON"),
    ("/v1/completions", b"{'prompt': 'x'}", 400, None, "not valid JSON"),
    ("/v1/completions", b'{"prompt": "x"} {"prompt": "y"}', 400, None, "not valid JSON"),
    ("/v1/completions", b"null", 400, None, "must be a JSON object"),
    ("/generate", b'"some text"', 400, None, "must be a JSON object"),
    # nesting bombs: a fast 400, whichever field holds them (unknown ones too)
    ("/v1/completions", b'{"prompt": ' + BOMB_LIST + b"}", 400, None, "nested too deeply"),
    ("/v1/completions", b'{"prompt": "x", "metadata": ' + BOMB_OBJECT + b"}", 400, None, "nested too deeply"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + BOMB_LIST + b"}]}", 400, None,
     "nested too deeply"),
    ("/generate", b'{"text": "x", "sampling_params": ' + BOMB_OBJECT + b"}", 400, None, "nested too deeply"),
    ("/generate", BOMB_LIST, 400, None, "nested too deeply"),
    # deep nesting the parser takes: the field's own error
    ("/v1/completions", {"prompt": deep_list(500)}, 400, "prompt"),
    ("/generate", {"text": "x", "sampling_params": {"stop": deep_list(500)}}, 400, "stop"),
    # JSON has no NaN or Infinity, and numbers must fit a double (integers: 100 digits)
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, None, "NaN"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_p": Infinity}', 400, None,
     "Infinity"),
    ("/generate", b'{"text": "x", "sampling_params": {"temperature": -Infinity}}', 400, None, "-Infinity"),
    ("/v1/completions", b'{"prompt": "x", "temperature": 1e999}', 400, None, "too large"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1' + b"0" * 200 + b"}", 400, None, "201 digits"),
    ("/generate", {"text": "x", "sampling_params": {"temperature": "NaN"}}, 400, "temperature"),
    # sampling values out of range, tiny or huge
    ("/v1/completions", {"prompt": "x", "temperature": -1e-300}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "top_k": 10**30}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": -0.1}, 400, "min_p"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ("/v1/chat/completions", {"messages": QUESTION, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": QUESTION, "frequency_penalty": -1e308}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {"messages": QUESTION, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "seed": -(2**63) - 1}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": 10**30}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 10**30}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_completion_tokens": 10**30}, 400, "max_completion_tokens"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 10**30}}, 400, "max_new_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 10_000}, 400, "n"),
    ("/v1/chat/completions", {"messages": QUESTION, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"messages": QUESTION, "n": 10_000}, 400, "n"),
    ("/generate", {"text": "x", "sampling_params": {"n": 0}}, 400, "n"),
    # logprobs out of range
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": -1}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": 1}, 400, "logprobs"),
    ("/generate", {"text": "x", "return_logprob": True, "top_logprobs_num": 21}, 400, "top_logprobs_num"),
    ("/generate", {"text": "x", "top_logprobs_num": -1}, 400, "top_logprobs_num"),
    # huge stop lists, stop token ids that fit no vocabulary or no 64 bits
    ("/v1/completions", {"prompt": "x", "stop_token_ids": list(range(5000))}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**30]}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {"messages": QUESTION, "stop": ["a"] * 33}, 400, "stop"),
    ("/generate", {"text": "x", "sampling_params": {"stop": ["s"] * 100_000}}, 400, "stop"),
    # roles
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": None, "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "USER", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [QUESTION[0], {"role": 7, "content": "hi"}]}, 400, "messages[1].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"text": "hi"}}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": QUESTION[0]}, 400, "messages"),
    # token ids outside the vocabulary: negative, >= its size, huge, not integers
    ("/v1/completions", {"prompt": [VOCAB]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, -1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1], [10**30]]}, 400, "prompt"),
    ("/generate", {"input_ids": [VOCAB]}, 400, "input_ids"),
    ("/generate", {"input_ids": [[1, 2], [3, 10**30]]}, 400, "input_ids"),
    ("/generate", {"input_ids": [1.5]}, 400, "input_ids"),
    ("/generate", {"input_ids": [True]}, 400, "input_ids"),
    # prompts past the context, and huge ones (refused before they are tokenized)
    ("/v1/completions", {"prompt": [1] * MAX_TOTAL_TOKENS}, 400, "prompt"),
    ("/generate", {"input_ids": [[1] * 5000]}, 400, "input_ids"),
    ("/v1/completions", {"prompt": HUGE_TEXT}, 400, "prompt", "characters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": HUGE_TEXT}]}, 400, "messages", "characters"),
    ("/generate", {"text": ["x", HUGE_TEXT]}, 400, "text", "characters"),
    # more lone surrogates
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "\ud800"}]}, 400,
     "messages[0].name"),
    ("/v1/completions", {"prompt": "x", "user": "\udfff"}, 400, "user"),
    ("/generate", {"text": ["ok", "\ud83d"]}, 400, "text"),
    # the one closed object: /generate's sampling_params (elsewhere unknown fields are ignored, see below)
    ("/generate", {"text": "x", "sampling_params": {"max_tokens": 5}}, 400, "max_tokens", "unknown"),
]
BAD_INPUT_SECONDS = 5  # each answered within this
RSS_GROWTH_MB = 64  # over two more passes of the table, after one to warm up


def post_bad(http: httpx.Client, path: str, body) -> httpx.Response:
    # json.dumps escapes non-ASCII (and lone surrogates) as \\uXXXX, as many clients do
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=raw, headers={"content-type": "application/json"})


def check_error(r: httpx.Response, status: int, param: str | None, words: str | None = None) -> None:
    """An OpenAI-style error: exactly message, type, param and code, the message saying `words`."""
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"] and error["type"], error
    assert len(error["message"]) < 1000, error  # never the input echoed back whole
    assert words is None or words in error["message"], error


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[f"{i}-{b[0]}-{b[3]}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_inputs(http, case):
    path, body, status, param, *words = case
    start = time.monotonic()
    r = post_bad(http, path, body)
    assert time.monotonic() - start < BAD_INPUT_SECONDS
    check_error(r, status, param, *words)
    if status == 404 and param == "model":
        assert r.json()["error"]["code"] == "model_not_found"


def rss_mb() -> float:
    with open("/proc/self/status") as f:  # this process is the server's main process (the engine runs in it)
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_bad_inputs_are_bounded(engine, http, client):
    """The whole table three times: each answer within BAD_INPUT_SECONDS, the server's memory steady after the
    first pass, and then it answers a normal request as before."""
    assert engine.tokenizer_manager.vocab_size == VOCAB
    rss = []
    for _ in range(3):
        for path, body, status, *_ in BAD_INPUTS:
            start = time.monotonic()
            r = post_bad(http, path, body)
            assert time.monotonic() - start < BAD_INPUT_SECONDS, (path, str(body)[:100])
            assert r.status_code == status
        gc.collect()
        rss.append(rss_mb())
    print(f"RSS after each pass (MB): {rss}")
    assert rss[-1] - rss[0] < RSS_GROWTH_MB, rss
    assert http.get("/health").status_code == 200
    want = greedy(engine, PROMPT, 4)["text"]
    assert complete(client, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text == want


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_body_must_be_sent_as_json(http, content_type):
    """A JSON body under another content type (or none) is a 415 that names the type to use."""
    for path, body in (("/v1/completions", {"prompt": PROMPT, "max_tokens": 1}), ("/generate", {"text": "x"}),
                       ("/v1/chat/completions", {"messages": QUESTION})):
        headers = {"content-type": content_type} if content_type else {}
        r = http.post(path, content=json.dumps(body).encode(), headers=headers)
        check_error(r, 415, None, "Content-Type: application/json")
        assert r.json()["error"]["code"] == "unsupported_media_type"


def test_lenient_where_harmless(engine, http):
    """Unknown fields are ignored, as OpenAI's SDKs and vLLM expect (a client may add its own), except in
    /generate's sampling_params (the table above); JSON's 2.0 is the integer 2; a UTF-8 BOM, a charset parameter
    and `application/*+json` are fine; a huge temperature is allowed (it samples near-uniformly)."""
    want = greedy(engine, PROMPT, 3)["text"]
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    variants = [
        ({**body, "metadata": {"k": [1, {"deep": None}]}, "service_tier": "auto"}, "application/json"),
        ({**body, "max_tokens": 3.0, "n": 1.0, "seed": 7.0}, "application/json"),
        (body, "application/json; charset=utf-8"),
        (body, "application/vnd.api+json"),
    ]
    for variant, content_type in variants:
        r = http.post("/v1/completions", content=json.dumps(variant).encode(), headers={"content-type": content_type})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (variant, r.text[:300])
    r = http.post("/v1/completions", content=b"\xef\xbb\xbf" + json.dumps(body).encode(),
                  headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    chat = {"messages": [{**QUESTION[0], "tool_call_id": None}], "max_tokens": 2, "stream_options": None, "x": 1}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    native = {"text": PROMPT, "sampling_params": {"max_new_tokens": 3.0, "temperature": 0}, "extra": True}
    assert http.post("/generate", json=native).json()["text"] == want
    r = http.post("/v1/completions", json={**body, "temperature": 1e300})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_errors_do_not_echo_huge_inputs(http):
    name = "m" * 1_000_000
    r = http.post("/v1/completions", json={"prompt": "x", "model": name})
    assert r.status_code == 404 and len(r.content) < 1000, len(r.content)
    r = http.get(f"/v1/models/{'m' * 60_000}")
    assert r.status_code == 404 and len(r.content) < 1000
    r = http.post("/v1/completions", json={"prompt": "x", "stop": ["s" * 10_000] * 40})
    assert r.status_code == 400 and len(r.content) < 1000


def test_errors_then_server_still_serves(client, http):
    assert http.get("/v1/completions").status_code == 405
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, messages=QUESTION, temperature=-3)
    assert exc.value.body["param"] == "temperature"
    assert complete(client, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_client_disconnect_frees_kv(url, http):
    wait_idle(http)
    body = {"prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=120) as other:
        with other.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # generation is under way
            # busy: the prefix cache cannot be flushed now
            assert http.post("/flush_cache").status_code == 400
    state = wait_idle(http)
    assert state["available_tokens"] + state["cached_tokens"] == state["max_total_num_tokens"]

    # a non-streaming client that gives up is noticed too
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=1.5) as impatient:
        impatient.post("/v1/completions", json=body)
    wait_idle(http)


# ---- operator routes --------------------------------------------------------------------------------------
def test_operator_routes(engine, http, client):
    assert http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 200
    for path in ("/server_info", "/get_server_info"):
        info = http.get(path).json()
        assert info["max_total_num_tokens"] == MAX_TOTAL_TOKENS and info["context_len"] > 0
        assert info["log_level"] == "warning" and info["version"]
        assert "used_tokens" in info["internal_states"][0]
        # the scheduler froze what it built at start-up (torch, the model): no full collection walks it mid-run
        assert info["internal_states"][0]["gc_frozen_objects"] > 50_000
    wait_idle(http)
    r = http.post("/flush_cache")
    assert (r.status_code, r.text) == (200, "Cache flushed.")
    assert http.get("/flush_cache").status_code == 200

    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("gridserve:num_running_reqs", "gridserve:prompt_tokens_total",
                 "gridserve:time_to_first_token_seconds"):
        assert name in metrics.text

    models = client.models.list().data
    name = engine.tokenizer_manager.served_model_name
    assert [(m.id, m.owned_by) for m in models] == [(name, "gridserve")]
    assert models[0].model_extra["max_model_len"] == engine.tokenizer_manager.info["context_len"]
    assert client.models.retrieve(name).id == name


def test_dead_scheduler_is_503(engine, http):
    tm = engine.tokenizer_manager
    tm.dead_reason = "scheduler dp0 pp0 tp0 exited with code -9"  # as launch sets it; restored below
    try:
        r = http.get("/health")
        assert r.status_code == 503 and "-9" in r.json()["error"]["message"]
        assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 503
        assert http.post("/generate", json={"text": "x"}).status_code == 503
    finally:
        tm.dead_reason = None
    assert http.get("/health").status_code == 200


def test_api_key(engine):
    args = engine.server_args
    if "api_key" in {f.name for f in dataclasses.fields(args)}:  # /server_info must not show it
        args = dataclasses.replace(args, api_key=API_KEY)
    app = create_app(engine.tokenizer_manager, args, api_key=API_KEY)
    with serve(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = http.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/generate", json={"text": "x"}).status_code == 401
        assert http.get("/server_info").status_code == 401
        for path in ("/health", "/metrics"):
            assert http.get(path).status_code == 200
        auth = {"Authorization": f"Bearer {API_KEY}"}
        assert http.get("/v1/models", headers=auth).status_code == 200
        info = http.get("/server_info", headers=auth).json()
        assert API_KEY not in json.dumps(info)
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)
        assert complete(client, prompt="Hi", max_tokens=1).usage.completion_tokens == 1


def test_request_body_limit(engine):
    """--max-request-bytes: a larger body is a 413 before it is read (Content-Length or chunked), and the server
    goes on serving."""
    args = dataclasses.replace(engine.server_args, max_request_bytes=100_000)
    with serve(create_app(engine.tokenizer_manager, args)) as base_url, \
            httpx.Client(base_url=base_url, timeout=60) as http:
        big = json.dumps({"prompt": "hello " * 50_000}).encode()
        start = time.monotonic()
        r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "--max-request-bytes (100000 bytes)" in r.json()["error"]["message"]
        assert time.monotonic() - start < 5

        def chunks():  # no Content-Length: the count of what arrives decides
            for i in range(0, len(big), 16_384):
                yield big[i:i + 16_384]

        r = http.post("/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


def test_405_has_allow_and_the_schema_says_400(http):
    r = http.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] == "405"
    schema = http.get("/openapi.json").json()
    responses = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert "400" in responses and "422" not in json.dumps(schema["paths"])


def test_a_huge_prompt_does_not_stall_other_requests(engine, url):
    """A multi-megabyte prompt is tokenized off the event loop: /health keeps answering at once meanwhile, and
    the prompt is then refused as longer than the server accepts. (Its length is just under max_prompt_chars: a
    longer one is refused at once, untokenized.)"""
    unit = "漢字かな交じり文 "  # ~1.7 tokens a character: a slow text to tokenize
    text = unit * (max_prompt_chars(engine.tokenizer_manager) // len(unit))
    body = json.dumps({"prompt": text, "max_tokens": 1}).encode()  # ~8 MB escaped, ~2M tokens
    result: dict = {}

    def big() -> None:
        start = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=120)
        result["status"], result["seconds"] = r.status_code, time.monotonic() - start

    t = threading.Thread(target=big)
    t.start()
    with httpx.Client(base_url=url, timeout=10) as probe:
        worst = longest_stall(t, lambda: probe.get("/health").raise_for_status())
    t.join()
    assert result["status"] == 400
    assert result["seconds"] > 0.5  # the tokenizing took a while: the probes above ran during it
    assert worst < 0.5, worst
