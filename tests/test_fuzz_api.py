"""Fuzzing the HTTP API with schemathesis, from the server's own /openapi.json (issue 17): requests generated for
/v1/completions, /v1/chat/completions and /generate, ones the schema allows (streaming or not) and ones it does not,
against a real server. No answer may be a 5xx or take long, every answer must be what the schema documents (status,
content type, body, each event of a stream), an invalid request must be refused, and afterwards the server must be
idle, healthy and give the same greedy output as before.

The server runs a tiny random Qwen3 over a byte-level tokenizer (259 tokens: any text is in its vocabulary, and
sampling over so few is cheap) with a context of 64 tokens, so that no request can cost much whatever it asks for.
Valid cases are drawn from a copy of the schema that caps n, max_tokens and array lengths, so each is cheap.

`make test` runs 1,026 cases; `pytest --long` (`make reliability`) 20,007. Generation is derandomized: the same cases
every run. A failure shows the request as a curl command."""

import copy
import json
import os
import time

import httpx
import jsonschema_rs
import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

from gridserve.entrypoints.openai.output import _byte_decoder
from tests.server_utils import ServerProcess
from tests.tiny_models import qwen_tokenizer_dir

ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate")
# Valid cases (positive: the schema allows them), valid streaming ones, invalid ones (negative: it does not).
KINDS = ("valid", "valid-stream", "invalid")
CASES, LONG_CASES = 1026, 20_007  # in all, over len(ROUTES) x len(KINDS) tests
CASE_LIMIT_S = 15  # each answer, a whole stream included, within this (a hung stream would be cut at the timeout)
CONTEXT = 64
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
# Caps on what valid cases ask for, so that each is cheap (the server's own limits are far above them): these
# fields' maximum, and at most CHEAP_ITEMS prompts, messages, token ids, ... in any array.
CHEAP = {"n": 2, "max_tokens": 4, "max_completion_tokens": 4, "max_new_tokens": 4}
CHEAP_ITEMS = 3
# Greedy requests whose answers must not change over the fuzzing.
REFERENCE = [
    ("/v1/completions", {"prompt": "The printing press", "max_tokens": 8, "temperature": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}),
    ("/generate", {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}),
]
STATS: dict = {}  # per test_fuzz test: counts of cases, statuses and streams, the slowest answer


def make_byte_model(path) -> None:
    """A random one-layer Qwen3 over a byte-level tokenizer: token i is byte i, plus three special tokens, and the
    chat template of Qwen3 (so template errors are exercised as they are with a real model)."""
    tokenizer = Tokenizer(models.BPE(vocab=dict(_byte_decoder()), merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # ids 256, 257, 258
    with open(os.path.join(qwen_tokenizer_dir(), "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=template, clean_up_tokenization_spaces=False).save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                      rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=258, pad_token_id=256,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # default init is tiny; widen it so the logits are not all ~equal
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)


def greedy_answers(url: str) -> list:
    answers = []
    for path, body in REFERENCE:
        r = httpx.post(f"{url}{path}", json=body, timeout=60)
        assert r.status_code == 200, r.text
        out = r.json()
        answers.append(out["output_ids"] if path == "/generate" else
                       [c.get("text", c.get("message")) for c in out["choices"]])
    return answers


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("byte-qwen3")
    make_byte_model(path)
    s = ServerProcess("--model", str(path), "--dtype", "float32", "--context-length", str(CONTEXT),
                      "--max-total-tokens", "1024")
    s.before = greedy_answers(s.url)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def schemas(server) -> dict:
    """The server's schema, from which invalid cases are drawn; valid ones come from a copy capped by CHEAP, and
    streaming ones from a copy that also says `stream: true` (else few valid cases would stream)."""
    raw = httpx.get(f"{server.url}/openapi.json").json()
    cheap, stream = copy.deepcopy(raw), copy.deepcopy(raw)
    for components in (cheap["components"]["schemas"], stream["components"]["schemas"]):
        for name in ("CompletionRequest", "ChatCompletionRequest", "ChatMessage", "GenerateRequest"):
            _cap(components[name])
        # completions' default max_tokens (16) is costly: give one
        completion = components["CompletionRequest"]
        completion["properties"]["max_tokens"]["anyOf"] = completion["properties"]["max_tokens"]["anyOf"][:1]
        completion["required"] = [*completion["required"], "max_tokens"]
        # /generate's default max_new_tokens (128) is past the context: give one, for all prompts
        generate = components["GenerateRequest"]
        params = generate["properties"]["sampling_params"] = generate["properties"]["sampling_params"]["anyOf"][0]
        params["required"], params["properties"]["max_new_tokens"]["type"] = ["max_new_tokens"], "integer"
        generate["required"] = [*generate.get("required", ()), "sampling_params"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "GenerateRequest"):
        model = stream["components"]["schemas"][name]
        model["properties"]["stream"] = {"const": True}
        model["required"] = [*model.get("required", ()), "stream"]
    loaded = {"invalid": schemathesis.openapi.from_dict(raw), "valid": schemathesis.openapi.from_dict(cheap),
              "valid-stream": schemathesis.openapi.from_dict(stream)}
    for schema in loaded.values():
        schema.config.output.sanitization.update(enabled=False)  # the reports show the request as sent
    return {"raw": raw, **loaded}


def _cap(node) -> None:
    """Lowers the `maximum` of the CHEAP fields wherever the schema names them, and the length of arrays."""
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "array" or isinstance(kind, list) and "array" in kind:
            node["maxItems"] = min(node.get("maxItems", CHEAP_ITEMS), CHEAP_ITEMS)
        for name, sub in (node.get("properties") or {}).items():
            if name in CHEAP and isinstance(sub, dict):
                sub["maximum"] = min(sub.get("maximum", CHEAP[name]), CHEAP[name])
        for value in node.values():
            _cap(value)
    elif isinstance(node, list):
        for value in node:
            _cap(value)


def is_stream(response) -> bool:
    return response.headers.get("content-type", [""])[0].startswith("text/event-stream")


def check_stream(raw_schema: dict, path: str, response) -> None:
    """A stream's events: each `data` is JSON of what the schema's contentSchema says (a chunk, or an error after
    the stream began), and the last is `[DONE]`; schemathesis checks only that `data` is a string."""
    event = raw_schema["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    content = event["properties"]["data"]["anyOf"][0]["contentSchema"]
    validator = jsonschema_rs.validator_for({**content, "components": raw_schema["components"]})
    text = response.content.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    if events[-1] == "data: [DONE]":
        events.pop()
    else:  # schemathesis reads 20 events, then hangs up (a client disconnect)
        assert response.stream_cut_short, events[-3:]
    for e in events:
        validator.validate(json.loads(e[len("data: "):]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ROUTES)
def test_fuzz(server, schemas, long_run, path, kind):
    operation = schemas[kind][path]["POST"]
    mode = GenerationMode.NEGATIVE if kind == "invalid" else GenerationMode.POSITIVE
    session = requests.Session()
    stats = STATS.setdefault(f"{path} {kind}", {"cases": 0, "streams": 0, "slowest": 0.0})

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=(LONG_CASES if long_run else CASES) // (len(ROUTES) * len(KINDS)), derandomize=True,
              database=None, deadline=None, phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    def one(case):
        start = time.monotonic()
        response = case.call(base_url=server.url, session=session, timeout=2 * CASE_LIMIT_S)
        seconds = time.monotonic() - start
        stats["slowest"] = max(stats["slowest"], seconds)
        stats["cases"] += 1
        stats[response.status_code] = stats.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)
        if is_stream(response):
            stats["streams"] += 1
            check_stream(schemas["raw"], path, response)
        assert seconds < CASE_LIMIT_S, f"{seconds:.1f} s for {case.as_curl_command(base_url=server.url)}"

    one()


def test_server_unchanged_after_fuzzing(server, long_run):
    """Runs after test_fuzz (file order): every case ran, both accepted and refused ones, and the server is idle,
    healthy and answers as before."""
    print()
    for name, stats in STATS.items():
        print(f"{name:36} {stats}")
    assert sum(stats["cases"] for stats in STATS.values()) >= (LONG_CASES if long_run else CASES), STATS
    assert all(stats.get(200) for name, stats in STATS.items() if "invalid" not in name), STATS
    assert all(stats["streams"] for name, stats in STATS.items() if "stream" in name), STATS
    assert httpx.get(f"{server.url}/health").status_code == 200
    deadline = time.monotonic() + 30
    while True:  # nothing left running, no KV cache held by a request
        state = httpx.get(f"{server.url}/server_info").json()["internal_states"][0]
        if state["num_running"] == state["num_waiting"] == state["used_tokens"] == 0:
            break
        assert time.monotonic() < deadline, f"the server did not go idle: {state}"
        time.sleep(0.2)
    assert greedy_answers(server.url) == server.before
