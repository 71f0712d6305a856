"""Pipeline parallelism end to end: `gridserve serve --pp 2` (and tp 2 x pp 2 on tiny models) gives the same
tokens as one process, with concurrent requests so that several micro-batches are in flight (the loop's own
counters in /server_info show it), and a killed stage ends the deployment."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server_utils import ServerProcess, assert_killing_ends_deployment
from tests.tiny_models import tiny_server_args

PROMPTS = ["The capital of France is", "Once upon a time", "List three colors:", "def fib(n):", "The moon is",
           "Water boils at", "My favourite book", "In 1969,"]


def _complete_all(server: ServerProcess, prompts: list, **kwargs) -> list:
    """Each prompt's text, or with logprobs its (text, token logprobs, top logprobs) from the last stage."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")

    def one(p):
        choice = client.completions.create(model="default", prompt=p, max_tokens=20, **kwargs).choices[0]
        if choice.logprobs is None:
            return choice.text
        return choice.text, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def _pp_state(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/server_info", timeout=10).json()["internal_states"][0]


@pytest.fixture(scope="module")
def embedded(embedded_server):
    two = ServerProcess("--pp", "2")
    yield embedded_server, two
    two.stop()


def test_pp2_equals_one_process_with_micro_batches_in_flight(embedded):
    one, two = embedded
    assert _complete_all(two, PROMPTS, temperature=0) == _complete_all(one, PROMPTS, temperature=0)
    seeded = dict(temperature=0.9, top_p=0.95, seed=11)
    assert _complete_all(two, PROMPTS[:4], **seeded) == _complete_all(one, PROMPTS[:4], **seeded)
    # logprobs travel back from the last stage with the tokens
    got, want = (_complete_all(s, PROMPTS[4:], temperature=0, logprobs=2) for s in (two, one))
    for (text, lp, top), (want_text, want_lp, want_top) in zip(got, want, strict=True):
        assert text == want_text and lp == pytest.approx(want_lp, abs=1e-4)
        assert [sorted(t) for t in top] == [sorted(t) for t in want_top]
    state = _pp_state(two)
    assert state["pp_max_in_flight"] == 2 and state["pp_micro_batches"] > 20
    # stage 0 ran its layers for part of the time it had work in flight, and idled the rest
    assert 0 < state["pp_busy_s"] < state["pp_active_s"]
    assert state["pp_idle_fraction"] == pytest.approx(1 - state["pp_busy_s"] / state["pp_active_s"], abs=0.05)
    assert "pp_max_in_flight" not in _pp_state(one)


def test_tp2_pp2_tiny_model_equals_one_process(tmp_path):
    args = tiny_server_args("qwen3", tmp_path)  # 3 layers: stages of 1 and 2 (Llama's grid: test_pipeline_parallel.py)
    prompts = [[(7 * i + 3 * j) % 200 + 5 for j in range(5 + 3 * i)] for i in range(6)]  # token ids
    prompts += [p + [9, 9] for p in prompts[3:]]  # prefixes the radix cache holds by then
    one = ServerProcess(*args)
    try:
        want = _complete_all(one, prompts[:6], temperature=0) + _complete_all(one, prompts[6:], temperature=0)
    finally:
        one.stop()
    grid = ServerProcess(*args, "--tp", "2", "--pp", "2", "--chunked-prefill-size", "8")  # chunks flow through
    try:
        assert _complete_all(grid, prompts[:6], temperature=0) == want[:6]
        assert _complete_all(grid, prompts[6:], temperature=0) == want[6:]
        state = _pp_state(grid)
        assert state["pp_max_in_flight"] == 2 and state["cached_prompt_tokens_total"] > 0
    finally:
        grid.stop()


def test_pp4_equals_one_process_and_a_killed_stage_ends_the_deployment(embedded):
    one, _ = embedded
    four = ServerProcess("--pp", "4")  # 30 layers: 7, 7, 8, 8
    try:
        assert _complete_all(four, PROMPTS, temperature=0) == _complete_all(one, PROMPTS, temperature=0)
        assert _pp_state(four)["pp_max_in_flight"] >= 2
        assert_killing_ends_deployment(four, "scheduler dp0 pp2 tp0")
    finally:
        four.stop()
