"""`gridserve bench offline` end to end on a tiny random Llama, and its workload-flag checks."""

import argparse
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gridserve.bench.offline import make_workload
from gridserve.cli import main
from tests.tiny_models import make_tiny_model

NUM_PROMPTS, INPUT_LENS, OUTPUT_LENS, SEED = 4, (3, 12), (2, 5), 1


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """The tiny Llama folder plus a word-level tokenizer over its 211 ids (the engine loads one)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_model("llama", path)
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", bos_token="t1", eos_token="t2",
                            unk_token="t3").save_pretrained(path)
    return str(path)


def test_offline_with_transformers(tiny_llama, tmp_path, capsys):
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--model", tiny_llama, "--num-prompts", str(NUM_PROMPTS),
            "--min-input-len", str(INPUT_LENS[0]), "--max-input-len", str(INPUT_LENS[1]),
            "--min-output-len", str(OUTPUT_LENS[0]), "--max-output-len", str(OUTPUT_LENS[1]), "--seed", str(SEED),
            "--max-total-tokens", "512", "--no-show-progress", "--log-level", "warning",
            "--compare-transformers", "--output-json", str(out)]
    assert main(argv) == 0

    want = make_workload(NUM_PROMPTS, INPUT_LENS, OUTPUT_LENS, 211, SEED)
    report = json.loads(out.read_text())
    assert report["workload"]["num_prompts"] == NUM_PROMPTS
    assert report["workload"]["output_tokens"] == want.output_tokens
    assert set(report["results"]) == {"gridserve", "transformers_bs1", "transformers_padded"}
    for r in report["results"].values():
        assert r["prompt_tokens"] == want.prompt_tokens
        assert r["output_tokens"] == want.output_tokens
        assert r["wall_s"] > 0 and r["output_tok_s"] > 0 and r["total_tok_s"] > r["output_tok_s"]
    for key in ("device", "torch_version", "transformers_version", "date", "git_commit", "dtype"):
        assert key in report
    floor = report["floor"]
    assert floor["rates"]["mem_bw"] > 0 and floor["rates"]["matmul_flops"] > 0
    assert floor["memory_s"] > 0 and floor["compute_s"] > 0
    assert floor["floor_s"] == pytest.approx(floor["memory_s"] + floor["compute_s"])
    assert floor["output_tokens"] == want.output_tokens and floor["output_tok_s"] > 0
    assert floor["decode_steps"] == max(want.output_lens) - 1  # 4 prompts fit the CPU default of 256 running
    assert set(floor["achieved_fraction"]) == set(report["results"])
    assert report["pp_stage0_idle_fraction"] is None  # one stage: no pipeline
    assert 0 < floor["achieved_fraction"]["gridserve"] <= 1  # nothing beats its floor
    printed = capsys.readouterr().out
    assert "transformers_padded" in printed and "output tok/s" in printed
    assert "of floor" in printed and "GB/s memory" in printed and "TFLOP/s" in printed
    assert "floor " in printed and "output tok/s, " in printed and "total tok/s" in printed


def test_offline_random_weights_with_padded_transformers_and_two_replicas_of_two_stages(tiny_llama, tmp_path,
                                                                                        capsys):
    # --load-format dummy: both systems get random weights (their own), so only throughput is compared;
    # gridserve runs as two DP replicas of two pipeline stages and reports the first stage's idle time
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--model", tiny_llama, "--load-format", "dummy", "--dp", "2", "--pp", "2",
            "--load-balance-method", "round_robin", "--num-prompts", "3",
            "--min-input-len", "4", "--max-input-len", "6", "--min-output-len", "2", "--max-output-len", "4",
            "--max-total-tokens", "512", "--no-show-progress", "--log-level", "warning", "--no-floor",
            "--compare-transformers", "padded", "--output-json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"gridserve", "transformers_padded"}
    assert report["load_format"] == "dummy" and report["moe_routing"] == "model"  # the report says how it ran
    want = make_workload(3, (4, 6), (2, 4), 211, 0).output_tokens
    assert all(r["output_tokens"] == want and r["output_tok_s"] > 0 for r in report["results"].values())
    assert 0 <= report["pp_stage0_idle_fraction"] < 1
    assert report["requests_per_replica"] == [2, 2]  # the warm-up and 3 prompts, taking turns
    printed = capsys.readouterr().out
    assert "pipeline stage 0 idle: " in printed and "requests per DP replica: [2, 2]" in printed


def test_workload_is_reproducible():
    a = make_workload(8, (5, 9), (1, 3), 50, seed=3)
    assert a == make_workload(8, (5, 9), (1, 3), 50, seed=3)
    assert all(5 <= len(p) <= 9 and all(0 <= t < 50 for t in p) for p in a.prompts)
    assert all(1 <= n <= 3 for n in a.output_lens)


@pytest.mark.parametrize("flags, message", [
    (["--min-input-len", "20", "--max-input-len", "10"], "--min-input-len (20) must be <= --max-input-len (10)"),
    (["--min-output-len", "0"], "--min-output-len must be >= 1"),
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
])
def test_bad_workload_flags(flags, message, capsys):
    # checked before any model loads: the default model is never touched
    assert main(["bench", "offline", *flags]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err


def test_short_runs_need_only_the_maximum_lengths():
    from gridserve.bench.offline import validate_workload_args

    args = argparse.Namespace(num_prompts=8, min_input_len=None, max_input_len=64, min_output_len=None,
                              max_output_len=32, temperature=0.6, plot=None)
    validate_workload_args(args)  # the issue's `--num-prompts 8 --max-input-len 64 --max-output-len 32`
    assert (args.min_input_len, args.min_output_len) == (64, 32)
    args = argparse.Namespace(num_prompts=8, min_input_len=None, max_input_len=1024, min_output_len=3,
                              max_output_len=1024, temperature=0.6, plot=None)
    validate_workload_args(args)
    assert (args.min_input_len, args.min_output_len) == (100, 3)  # nano-vllm's workload by default
