"""`gridserve bench serving` against a live `gridserve serve` on the embedded model (real processes, real sockets),
plus the metric math on hand-made timings and the flag checks."""

import json
import math
import subprocess
from argparse import Namespace

import pytest

from gridserve.bench.datasets import PromptMaker, build_requests, sample_shared_prefix
from gridserve.bench.serving import RequestOutput, compute_metrics, format_result, order_violations, parse_rates
from gridserve.cli import main
from tests.server_utils import GRIDSERVE, ServerProcess, free_port

LABELS = ("Serving Benchmark Result", "Backend:", "Traffic request rate:", "Max request concurrency:",
          "Successful requests:", "Benchmark duration (s):", "Total input tokens:", "Total generated tokens:",
          "Request throughput (req/s):", "Input token throughput (tok/s):", "Output token throughput (tok/s):",
          "Total token throughput (tok/s):", "Concurrency:", "Mean E2E Latency (ms):", "Median E2E Latency (ms):",
          "Mean TTFT (ms):", "Median TTFT (ms):", "P99 TTFT (ms):", "Mean TPOT (ms):", "Median TPOT (ms):",
          "P99 TPOT (ms):", "Mean ITL (ms):", "Median ITL (ms):", "P99 ITL (ms):", "Prefill steps:",
          "First tokens out of arrival order:")


KEY = "bench-key"


@pytest.fixture(scope="module")
def server():
    s = ServerProcess("--api-key", KEY)  # bench serving must send it (tests below check both ways)
    yield s
    s.stop()


def bench(server, tmp_path, *flags: str, key: str | None = KEY) -> tuple[int, list[dict]]:
    out = tmp_path / "results.jsonl"
    auth = ["--api-key", key] if key else []
    rc = main(["bench", "serving", "--base-url", server.url, "--disable-tqdm", "--output-file", str(out), *auth,
               *flags])
    return rc, [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def assert_sane(r: dict, num: int, output_len: int) -> None:
    assert (r["completed"], r["failed"], r["errors"]) == (num, 0, [])
    assert r["total_output_tokens"] == num * output_len  # ignore_eos: every request runs to max_tokens
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms",
                "median_itl_ms", "mean_e2e_latency_ms", "output_throughput", "request_throughput", "concurrency"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert r["mean_e2e_latency_ms"] >= r["mean_ttft_ms"]


def test_random_dataset(server, tmp_path, capsys):
    rc, results = bench(server, tmp_path, "--num-prompts", "8", "--random-input-len", "32", "--random-output-len",
                        "8", "--random-range-ratio", "1", "--max-concurrency", "4")
    out = capsys.readouterr().out
    assert rc == 0
    [r] = results
    assert_sane(r, 8, 8)
    assert r["total_input_tokens"] == 8 * 32  # token-id prompts: exact input lengths
    assert r["model"] == "SmolLM2-135M-Instruct" and r["max_concurrency"] == 4 and r["request_rate"] == "inf"
    assert r["args"]["random_input_len"] == 32
    assert 1 <= r["prefill_steps"] <= 8 and r["order_violations"] == 0  # 4 at a time, first come first served
    for label in LABELS:
        assert label in out, label
    print(out)


def test_requests_one_after_another_keep_their_connection(server):
    """Requests in turn share one kept-alive connection (each stream read to its end): a new connection a request
    would sit inside every TTFT. aiohttp's tracing counts the connections made and reused."""
    import asyncio

    import aiohttp

    from gridserve.bench.datasets import BenchRequest
    from gridserve.bench.serving import open_client, send_request

    made, reused = [], []

    async def run() -> list:
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(lambda *_: asyncio.sleep(0, made.append(1)))
        trace.on_connection_reuseconn.append(lambda *_: asyncio.sleep(0, reused.append(1)))
        async with open_client({"Authorization": f"Bearer {KEY}"}, [trace]) as client:
            body = {"model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 4,
                    "stream": True, "stream_options": {"include_usage": True}}
            return [await send_request(client, server.url + "/v1/completions", body, BenchRequest("x", 5, 4))
                    for _ in range(4)]

    outs = asyncio.run(run())
    assert all(o.success and o.output_len == 4 for o in outs), [o.error for o in outs]
    assert (len(made), len(reused)) == (1, 3)


def test_shared_prefix_chat_at_a_request_rate(server, tmp_path):
    rc, results = bench(server, tmp_path, "--dataset-name", "generated-shared-prefix", "--endpoint", "chat",
                        "--gsp-num-groups", "2", "--gsp-prompts-per-group", "2", "--gsp-system-prompt-len", "48",
                        "--gsp-question-len", "8", "--gsp-output-len", "4", "--request-rate", "8",
                        "--warmup-requests", "0")
    assert rc == 0
    [r] = results
    assert_sane(r, 4, 4)
    assert r["request_rate"] == 8.0 and r["dataset_name"] == "generated-shared-prefix"
    assert r["total_input_tokens"] > 4 * (48 + 8)  # words are >= 1 token each, plus the chat template


def write_sharegpt(path) -> str:
    """A ShareGPT file as SGLang's and vLLM's benchmarks read it, with entries their sampling skips."""
    convs = [[("human", f"Question {i}: name a river in Europe and say where it flows."),
              ("gpt", "The Danube flows from Germany to the Black Sea, through ten countries on its way.")]
             for i in range(5)]
    data = [{"id": str(i), "conversations": [{"from": who, "value": text} for who, text in c]}
            for i, c in enumerate(convs)]
    data += [{"id": "one turn", "conversations": [{"from": "human", "value": "Hello there, how are you?"}]},
             {"id": "short answer", "conversations": [{"from": "human", "value": "Say yes or no."},
                                                      {"from": "gpt", "value": "Yes"}]},
             {"id": "no turns"}, "not a conversation"]
    path.write_text(json.dumps(data))
    return str(path)


def test_sharegpt_dataset(server, tmp_path):
    from gridserve.model_loader.paths import default_model_path

    data = write_sharegpt(tmp_path / "sharegpt.json")
    rc, results = bench(server, tmp_path, "--dataset-name", "sharegpt", "--dataset-path", data, "--tokenizer",
                        default_model_path(), "--num-prompts", "8", "--max-concurrency", "2",
                        "--sharegpt-output-len", "3", "--warmup-requests", "1")
    assert rc == 0
    [r] = results
    assert_sane(r, 6, 3)  # the 6 conversations of two turns: the file runs out before 8
    assert r["dataset_name"] == "sharegpt"
    assert 5 * 12 + 4 <= r["total_input_tokens"] <= 5 * 30 + 10  # the server's count of the questions' text


def test_sharegpt_sampling_follows_sglang(tmp_path):
    import random

    from gridserve.bench.datasets import load_sharegpt, sample_sharegpt
    from gridserve.model_loader.paths import default_model_path
    from gridserve.tokenizer import get_tokenizer

    tok = get_tokenizer(default_model_path())
    pairs = load_sharegpt(write_sharegpt(tmp_path / "sharegpt.json"))
    rivers = [f"Question {i}: name a river in Europe and say where it flows." for i in range(5)]
    assert [p[0] for p in pairs] == [*rivers, "Say yes or no."]  # the entries without two turns are left out
    pairs.append(("a question of some words", "an answer"))
    reqs = sample_sharegpt(pairs, random.Random(0), 10, tok, as_ids=False)
    assert sorted(r.prompt for r in reqs) == sorted([*rivers, "a question of some words"])  # "Yes": one token
    answers = dict(pairs)
    for r in reqs:
        assert r.prompt_len == len(tok.encode(r.prompt, add_special_tokens=False))
        assert r.output_len == len(tok.encode(answers[r.prompt], add_special_tokens=False))
    assert sample_sharegpt(pairs, random.Random(0), 10, tok, as_ids=False) == reqs  # seeded
    assert [r.prompt for r in sample_sharegpt(pairs, random.Random(1), 6, tok, as_ids=False)] != [
        r.prompt for r in reqs]  # and shuffled by the seed
    [one] = sample_sharegpt(pairs, random.Random(1), 1, tok, as_ids=True, output_len=7)
    assert isinstance(one.prompt, list) and len(one.prompt) == one.prompt_len and one.output_len == 7
    short = next(r for r in reqs if r.prompt == "a question of some words")
    fits = sample_sharegpt(pairs, random.Random(0), 10, tok, as_ids=False,
                           context_len=short.prompt_len + short.output_len)
    assert fits == [short]  # the river questions are longer


@pytest.mark.parametrize("content, message", [
    ("{not json", "Expecting property name"), ('{"conversations": []}', "a JSON list of conversations"),
    ('[{"conversations": [{"value": "only one turn"}]}]', "no conversation with two turns"),
])
def test_sharegpt_file_errors_exit_2(tmp_path, capsys, content, message):
    from gridserve.model_loader.paths import default_model_path

    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["bench", "serving", "--dataset-name", "sharegpt", "--dataset-path", str(path), "--tokenizer",
                 default_model_path()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gridserve bench serving: error: --dataset-path {path}") and message in err, err


def test_sweep_of_two_rates_plots(server, tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    try:
        import matplotlib  # noqa: F401

        flags = ["--plot", str(plot)]
    except ImportError:
        flags = []
    rc, results = bench(server, tmp_path, "--num-prompts", "4", "--random-input-len", "16", "--random-output-len",
                        "4", "--random-range-ratio", "1", "--sweep-request-rates", "16,inf", "--warmup-requests", "0",
                        *flags)
    assert rc == 0
    assert [r["request_rate"] for r in results] == [16.0, "inf"]
    for r in results:
        assert_sane(r, 4, 4)
    if flags:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plot written to {plot}" in capsys.readouterr().out


def test_api_key_from_the_flag_or_the_environment_and_a_clear_401(server, tmp_path, capsys, monkeypatch):
    flags = ("--num-prompts", "1", "--random-input-len", "8", "--random-output-len", "2", "--warmup-requests", "0")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    rc, _ = bench(server, tmp_path, *flags, key=None)
    err = capsys.readouterr().err
    assert rc == 1 and "401 Unauthorized" in err and "--api-key" in err, err
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    rc, results = bench(server, tmp_path, *flags, key=None)
    assert rc == 0 and results[-1]["completed"] == 1
    assert KEY not in json.dumps(results)  # the key never lands in the results file


@pytest.mark.parametrize("flags, message", [
    (["--random-input-len", "-1"], "--random-input-len must be >= 1"),
    (["--random-range-ratio", "1.5"], "--random-range-ratio must be in [0, 1]"),
    (["--request-rate", "0"], "--request-rate must be > 0"),
    (["--sweep-request-rates", "1,x"], "--sweep-request-rates: 'x' is not a number"),
    (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["--endpoint", "chat", "--prompt-format", "token-ids"], "--prompt-format token-ids needs"),
    (["--dataset-name", "sharegpt"], "--dataset-name sharegpt needs --dataset-path"),
    (["--sharegpt-output-len", "0"], "--sharegpt-output-len must be >= 1"),
])
def test_bad_flags_exit_2(flags, message, capsys):
    assert main(["bench", "serving", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gridserve bench serving: error:") and message in err and "\n" not in err


def test_unreachable_server_exits_1():
    url = f"http://127.0.0.1:{free_port()}"
    p = subprocess.run([GRIDSERVE, "bench", "serving", "--base-url", url], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip() == f"gridserve bench serving: error: cannot reach {url}: Connection refused"


def test_metric_math_on_hand_made_timings():
    outputs = [
        RequestOutput(True, "", 10, 10, ttft=0.1, latency=1.0, itl=[0.1] * 9),  # TPOT 0.9 / 9 = 100 ms
        RequestOutput(True, "", 20, 5, ttft=0.3, latency=2.0, itl=[0.2, 0.5, 0.5, 0.5]),  # TPOT 1.7 / 4 = 425 ms
        RequestOutput(True, "", 30, 1, ttft=0.5, latency=0.5),  # one token: no TPOT
        RequestOutput(False, "HTTP 500: boom", 40),
    ]
    m = compute_metrics(outputs, duration=4.0)
    assert (m["completed"], m["failed"], m["errors"]) == (3, 1, ["HTTP 500: boom"])
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 16)
    assert m["request_throughput"] == pytest.approx(0.75)
    assert m["output_throughput"] == pytest.approx(4.0) and m["total_throughput"] == pytest.approx(19.0)
    assert m["concurrency"] == pytest.approx(3.5 / 4)  # summed E2E over the duration
    assert m["mean_ttft_ms"] == pytest.approx(300) and m["median_ttft_ms"] == pytest.approx(300)
    assert m["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 400)  # linear interpolation between order statistics
    assert m["std_ttft_ms"] == pytest.approx(math.sqrt((200**2 + 0 + 200**2) / 3))
    assert m["mean_tpot_ms"] == pytest.approx(262.5) and m["median_tpot_ms"] == pytest.approx(262.5)
    assert m["max_tpot_ms"] == pytest.approx(425)
    assert m["mean_itl_ms"] == pytest.approx(1000 * (0.9 + 1.7) / 13) and m["median_itl_ms"] == pytest.approx(100)
    assert m["max_itl_ms"] == pytest.approx(500)
    assert m["median_e2e_latency_ms"] == pytest.approx(1000) and m["p90_e2e_latency_ms"] == pytest.approx(1800)
    block = format_result(m, "gridserve", math.inf, None)
    assert "Median TPOT (ms):                        262.50" in block
    assert "Traffic request rate:                    inf" in block and "not set" in block
    empty = compute_metrics([RequestOutput(False, "x")], duration=1.0)
    assert empty["completed"] == 0 and empty["mean_ttft_ms"] == 0.0  # SGLang reports 0, not nan


def test_order_violations_count_requests_passed_over():
    def at(t: float) -> RequestOutput:
        return RequestOutput(True, first_token_at=t)

    assert order_violations([at(1.0), at(1.002), at(1.001), at(2.0)]) == 0  # within one step's jitter
    assert order_violations([at(1.0), at(3.0), at(2.0), at(2.5), at(4.0)]) == 2  # two got theirs before the 2nd
    assert order_violations([at(2.0), RequestOutput(False, "x"), at(1.0)]) == 1  # failures are skipped


def test_parse_rates():
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    with pytest.raises(ValueError, match="must be > 0"):
        parse_rates("1,-2")


def test_datasets_lengths_and_shared_prefixes():
    args = Namespace(dataset_name="random", endpoint="completions", prompt_format="auto", seed=3, num_prompts=50,
                     random_input_len=40, random_output_len=20, random_range_ratio=0.5)
    reqs = build_requests(args)
    assert all(isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len for r in reqs)
    assert all(20 <= r.prompt_len <= 40 and 10 <= r.output_len <= 20 for r in reqs)
    assert reqs == build_requests(args)  # seeded
    args.endpoint = "chat"
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == r.prompt_len for r in build_requests(args))

    import random

    reqs = sample_shared_prefix(PromptMaker(random.Random(0), as_ids=True), 3, 4, 16, 5, 7)
    assert len(reqs) == 12 and all(r.prompt_len == 21 and r.output_len == 7 for r in reqs)
    assert len({tuple(r.prompt[:16]) for r in reqs}) == 3  # three shared system prompts
    assert len({tuple(r.prompt) for r in reqs}) == 12
