"""Data parallelism end to end: `--dp 2` (the embedded model), and dp 2 x tp 2 and dp 2 x pp 2 (a tiny Qwen3 of
4 heads and 3 layers) give the tokens of one replica for concurrent requests; each load-balance method spreads
requests as it should, seen from the replicas' own counters in /server_info; a disconnected client's request is
freed on its replica; killing a rank of either replica ends the deployment."""

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest

from gridserve.entrypoints.engine import Engine
from gridserve.entrypoints.grpc import gridserve_pb2 as pb
from gridserve.entrypoints.grpc import gridserve_pb2_grpc as pb_grpc
from tests.server_utils import GRIDSERVE, ServerProcess, assert_killing_ends_deployment, listening_addresses
from tests.tiny_models import tiny_server_args

PROMPTS = [[(7 * i + 3 * j) % 200 + 5 for j in range(5 + 3 * i)] for i in range(8)]  # token ids in both vocabularies


@pytest.fixture(scope="module")
def model_args(tmp_path_factory) -> tuple[str, ...]:
    return tiny_server_args("qwen3", tmp_path_factory.mktemp("tiny-qwen3"))


@pytest.fixture(scope="module")
def one(model_args):
    """One replica of the tiny model."""
    server = ServerProcess(*model_args)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def round_robin():
    """Two replicas of the embedded model (a real vocabulary: the shared-prefix benchmark draws ids up to 10k)."""
    server = ServerProcess("--dp", "2", "--load-balance-method", "round_robin")
    yield server
    server.stop()


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def _complete(server: ServerProcess, prompt, max_tokens: int = 12, **kwargs) -> str:
    return _client(server).completions.create(model="default", prompt=prompt, max_tokens=max_tokens,
                                              **kwargs).choices[0].text


def _complete_all(server: ServerProcess, prompts: list, **kwargs) -> list[str]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: _complete(server, p, **kwargs), prompts))


def _states(server: ServerProcess) -> list[dict]:
    return httpx.get(f"{server.url}/server_info", timeout=10).json()["internal_states"]


def _received(server: ServerProcess) -> list[int]:
    return [s["num_received"] for s in _states(server)]


SEEDED = dict(temperature=0.9, top_p=0.95, seed=11)


def test_dp2_equals_one_replica_and_round_robin_alternates(embedded_server, round_robin):
    want = _complete_all(embedded_server, PROMPTS, temperature=0)
    assert _complete_all(round_robin, PROMPTS, temperature=0) == want
    assert _complete_all(round_robin, PROMPTS[:4], **SEEDED) == _complete_all(embedded_server, PROMPTS[:4], **SEEDED)
    states = _states(round_robin)
    assert [s["dp_rank"] for s in states] == [0, 1]
    assert [s["num_received"] for s in states] == [6, 6]  # 12 requests, concurrent or not
    # one at a time: the replicas take turns
    order = []
    for p in PROMPTS[:6]:
        before = _received(round_robin)
        _complete(round_robin, p, max_tokens=2)
        after = _received(round_robin)
        order.append(next(r for r in range(2) if after[r] > before[r]))
    assert order in ([0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0])


def test_routed_dp_rank_pins_and_out_of_range_is_a_400(round_robin):
    before = _received(round_robin)
    for p in PROMPTS[:3]:
        _complete(round_robin, p, max_tokens=2, extra_body={"routed_dp_rank": 1})
    r = httpx.post(f"{round_robin.url}/generate", json={"input_ids": PROMPTS[0], "routed_dp_rank": 0,
                                                        "sampling_params": {"max_new_tokens": 2}}, timeout=30)
    assert r.status_code == 200
    assert [a - b for a, b in zip(_received(round_robin), before, strict=True)] == [1, 3]
    for bad in (2, -1):
        r = httpx.post(f"{round_robin.url}/v1/completions", timeout=10, json={
            "model": "default", "prompt": PROMPTS[0], "routed_dp_rank": bad})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "routed_dp_rank" and "must be an int in [0, 2)" in err["message"]
    r = httpx.post(f"{round_robin.url}/generate", json={"input_ids": PROMPTS[0], "routed_dp_rank": 7}, timeout=10)
    assert r.status_code == 400 and "2 data-parallel replicas" in r.json()["error"]["message"]
    assert _received(round_robin) == [a + b for a, b in zip(before, [1, 3], strict=True)]  # nothing sent


def test_metrics_carry_dp_rank_and_fall_to_zero_when_idle(round_robin):
    _complete_all(round_robin, PROMPTS[:4], temperature=0)
    text = httpx.get(f"{round_robin.url}/metrics", timeout=10).text
    running = [ln for ln in text.splitlines() if ln.startswith("gridserve:num_running_reqs{")]
    assert len(running) == 2 and {'dp_rank="0"' in running[0], 'dp_rank="1"' in running[1]} == {True}
    assert all(ln.endswith(" 0.0") for ln in running), running
    # the front end's counters stay whole (no dp_rank)
    assert any(ln.startswith("gridserve:num_requests_total{model_name=") for ln in text.splitlines())


def _shared_prefix_run(server: ServerProcess, tmp_path, name: str) -> dict:
    out = tmp_path / f"{name}.jsonl"
    cmd = [GRIDSERVE, "bench", "serving", "--base-url", server.url, "--dataset-name", "generated-shared-prefix",
           "--gsp-num-groups", "8", "--gsp-prompts-per-group", "8", "--gsp-system-prompt-len", "256",
           "--gsp-question-len", "8", "--gsp-output-len", "2", "--max-concurrency", "2", "--seed", "3",
           "--warmup-requests", "0", "--disable-tqdm", "--output-file", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_cache_aware_keeps_prefixes_warm_where_round_robin_does_not(round_robin, tmp_path):
    cache_aware = ServerProcess("--dp", "2")  # the default method with dp > 1
    try:
        aware = _shared_prefix_run(cache_aware, tmp_path, "cache_aware")
        assert_killing_ends_deployment(cache_aware, "dp_controller")  # the controller is no single point of hang
    finally:
        cache_aware.stop()
    rr = _shared_prefix_run(round_robin, tmp_path, "round_robin")
    print(f"\n[dp 2, 8 groups x 8 prompts sharing 256-token prefixes] cache hit rate: cache_aware "
          f"{aware['cache_hit_rate']:.3f} ({aware['output_throughput']:.1f} out tok/s, requests "
          f"{aware['requests_per_replica']}), round_robin {rr['cache_hit_rate']:.3f} "
          f"({rr['output_throughput']:.1f} out tok/s, requests {rr['requests_per_replica']})")
    assert aware["completed"] == rr["completed"] == 64
    # each group's prefix is computed once with cache_aware, about once per replica with round_robin
    assert aware["cache_hit_rate"] > 0.8
    assert aware["cache_hit_rate"] > rr["cache_hit_rate"] + 0.08
    assert min(aware["requests_per_replica"]) >= 16  # the groups still spread over both replicas


@pytest.fixture(scope="module")
def dp2_pp2(model_args):
    server = ServerProcess(*model_args, "--dp", "2", "--pp", "2", "--load-balance-method", "total_requests")
    yield server
    server.stop()


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_dp2_pp2_equals_one_replica(one, dp2_pp2):
    assert _complete_all(dp2_pp2, PROMPTS, temperature=0) == _complete_all(one, PROMPTS, temperature=0)
    assert _complete_all(dp2_pp2, PROMPTS[:4], **SEEDED) == _complete_all(one, PROMPTS[:4], **SEEDED)
    assert all(s["pp_micro_batches"] > 0 for s in _states(dp2_pp2))


def test_total_requests_avoids_a_busy_replica_and_a_disconnect_frees_it(dp2_pp2):
    """A long request keeps one replica busy: new requests go to the other, a burst spreads instead of piling
    onto the one that looked idle, and when the long request's client goes away its replica frees its KV."""
    url = dp2_pp2.url
    stop, started = threading.Event(), threading.Event()

    def long_stream():
        body = {"input_ids": PROMPTS[1], "stream": True,
                "sampling_params": {"max_new_tokens": 480, "ignore_eos": True, "temperature": 0}}
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                started.set()
                if stop.is_set():
                    return  # closes the connection mid-stream

    before = _received(dp2_pp2)
    t = threading.Thread(target=long_stream)
    t.start()
    try:
        assert started.wait(30)
        busy = next(r for r, s in enumerate(_states(dp2_pp2)) if s["num_running"] == 1)
        idle = 1 - busy
        for p in PROMPTS[:4]:  # one at a time: the idle replica always has fewer requests
            _complete(dp2_pp2, p, max_tokens=2)
        grown = [a - b for a, b in zip(_received(dp2_pp2), before, strict=True)]
        assert grown[idle] == 4 and grown[busy] == 1
        # a burst of 8 that stays in flight while it arrives (a finished request would free room on its replica)
        _complete_all(dp2_pp2, PROMPTS, max_tokens=24, extra_body={"ignore_eos": True})
        burst = [a - b - g for a, b, g in zip(_received(dp2_pp2), before, grown, strict=True)]
        assert sum(burst) == 8 and max(burst) <= 5, burst
        assert _states(dp2_pp2)[busy]["num_running"] == 1  # still generating
    finally:
        stop.set()
        t.join(60)
    assert _wait_for(lambda: all(s["num_running"] == 0 and s["used_tokens"] == 0 for s in _states(dp2_pp2)))
    text = httpx.get(f"{url}/metrics", timeout=10).text
    aborted = next(ln for ln in text.splitlines() if ln.startswith("gridserve:num_aborted_requests_total{"))
    assert float(aborted.split()[-1]) >= 1


def test_dp2_tp2_equals_one_replica_then_killing_ranks_ends_the_deployments(one, model_args, dp2_pp2):
    grid = ServerProcess(*model_args, "--dp", "2", "--tp", "2")
    try:
        assert _complete_all(grid, PROMPTS, temperature=0) == _complete_all(one, PROMPTS, temperature=0)
        assert len(_states(grid)) == 2
        # the store, gloo, ZMQ and HTTP of the whole deployment listen on 127.0.0.1 only
        assert listening_addresses([grid.proc.pid, *grid.descendants()]) == {"127.0.0.1"}
        assert_killing_ends_deployment(grid, "scheduler dp0 pp0 tp1")
    finally:
        grid.stop()
    assert_killing_ends_deployment(dp2_pp2, "scheduler dp1 pp1 tp0")


def test_dp2_grpc_and_offline_engine_equal_one_replica(one, model_args, tmp_path):
    want = _complete(one, PROMPTS[2], temperature=0)
    g = ServerProcess(*model_args, "--dp", "2", grpc=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{g.port}") as channel:
            stub = pb_grpc.GenerationStub(channel)
            req = pb.GenerateRequest(input_ids=pb.TokenIds(ids=PROMPTS[2]), stream=True,
                                     sampling_params=pb.SamplingParams(temperature=0, max_new_tokens=12))
            assert "".join(r.text for r in stub.Generate(req, timeout=60)) == want
    finally:
        g.stop()
    kwargs = dict(zip(("model", "tokenizer_path", "dtype"), model_args[1::2], strict=True))
    with Engine(dp_size=2, max_total_tokens=4096, show_progress=False, log_level="warning", **kwargs) as engine:
        got = engine.generate(input_ids=PROMPTS, sampling_params={"temperature": 0, "max_new_tokens": 12})
        pinned = engine.generate(input_ids=PROMPTS[:2], sampling_params={"temperature": 0, "max_new_tokens": 12},
                                 routed_dp_rank=1)
        info = engine.get_server_info()
    assert [g["text"] for g in got] == _complete_all(one, PROMPTS, temperature=0)
    assert [g["text"] for g in pinned] == [g["text"] for g in got[:2]]
    assert [s["dp_rank"] for s in info["internal_states"]] == [0, 1]
    assert sum(s["num_received"] for s in info["internal_states"]) == len(PROMPTS) + 2
