"""Tensor parallelism end to end on the embedded model. SmolLM2-135M has 9 attention heads and 3 KV heads, so
it splits over 3 ranks (not 2): `--tp 3` must equal `--tp 1` token for token, and `--tp 2` must fail at start
with the numbers."""

import subprocess

import grpc
import openai
import pytest

from gridserve.entrypoints.engine import Engine
from gridserve.entrypoints.grpc import gridserve_pb2 as pb
from gridserve.entrypoints.grpc import gridserve_pb2_grpc as pb_grpc
from tests.server_utils import GRIDSERVE, ServerProcess, assert_killing_ends_deployment

MESSAGES = [{"role": "user", "content": "Give me two facts about the moon."}]


@pytest.fixture(scope="module")
def servers(embedded_server):
    tp3 = ServerProcess("--tp", "3")
    yield embedded_server, tp3
    tp3.stop()


def _clients(servers):
    return [openai.OpenAI(base_url=f"{s.url}/v1", api_key="none") for s in servers]


def test_tp3_greedy_and_seeded_sampling_equal_tp1(servers):
    a, b = _clients(servers)
    # each token on tp 3 is three gloo ranks on CI's two cores: few and short requests
    for kwargs in ({"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "seed": 7}):
        outs = [c.chat.completions.create(model="default", messages=MESSAGES, max_tokens=16, **kwargs)
                for c in (a, b)]
        assert outs[0].choices[0].message.content == outs[1].choices[0].message.content, kwargs
    outs = [c.completions.create(model="default", prompt="Once upon a time", max_tokens=12, temperature=0)
            for c in (a, b)]
    assert outs[0].choices[0].text == outs[1].choices[0].text


def test_tp3_offline_engine_equals_tp1_server(servers):
    a, _ = _clients(servers)
    want = a.completions.create(model="default", prompt="The three primary colors are", max_tokens=16, temperature=0)
    with Engine(tp_size=3, max_total_tokens=4096, show_progress=False, log_level="warning") as engine:
        got = engine.generate("The three primary colors are", {"temperature": 0, "max_new_tokens": 16})
    assert got["text"] == want.choices[0].text


def test_tp3_grpc_then_a_killed_rank_ends_the_deployment(servers):
    a, _ = _clients(servers)
    want = a.completions.create(model="default", prompt="The capital of France is", max_tokens=12, temperature=0)
    g = ServerProcess("--tp", "3", grpc=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{g.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            req = pb.GenerateRequest(text="The capital of France is", stream=True,
                                     sampling_params=pb.SamplingParams(temperature=0, max_new_tokens=12))
            assert "".join(r.text for r in stub.Generate(req, timeout=60)) == want.choices[0].text
        assert_killing_ends_deployment(g, "scheduler dp0 pp0 tp1")
    finally:
        g.stop()


def test_tp2_on_a_9_head_model_fails_at_start_with_the_numbers():
    p = subprocess.run([GRIDSERVE, "serve", "--tp", "2", "--max-total-tokens", "4096", "--no-show-progress"],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 1
    assert "--tp-size 2 does not divide num_attention_heads 9" in p.stdout + p.stderr
