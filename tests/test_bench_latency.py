"""`gridserve bench latency` on the embedded model: runs, and reports TTFT, TPOT and their floors in its JSON."""

import json

import pytest

from gridserve.cli import main

COMMON = ["bench", "latency", "--input-len", "8", "--output-len", "4", "--num-runs", "1", "--max-total-tokens", "1024",
          "--no-show-progress"]


@pytest.fixture(scope="module")
def one_request(tmp_path_factory):
    """bench latency at batch 1: its JSON and what it printed."""
    out = tmp_path_factory.mktemp("lat") / "lat.json"
    rc = main([*COMMON, "--output-json", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_bench_latency_reports_ttft_and_tpot(one_request):
    r = one_request
    assert r["batch_size"] == 1 and r["ttft_ms_median"] > 0 and r["tpot_ms_median"] > 0
    f = r["floor"]
    assert f["rates"]["mem_bw"] > 0 and f["rates"]["matmul_flops"] > 0
    assert 0 < f["tpot_ms"] <= r["tpot_ms_median"] and 0 < f["ttft_ms"] <= r["ttft_ms_median"]
    assert f["tpot_fraction"] == f["tpot_ms"] / r["tpot_ms_median"]


def test_bench_latency_sends_a_batch_at_once(one_request, tmp_path, capsys):
    """--batch-size 3: three streamed requests at once, each checked for all its tokens; the floor reads the KV of
    three and prefills three prompts; it prints the TPOT and the floors."""
    out = tmp_path / "lat3.json"
    assert main([*COMMON, "--batch-size", "3", "--output-json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["batch_size"] == 3 and r["tpot_ms_median"] > 0
    assert r["floor"]["kv_bytes_per_step"] == 3 * one_request["floor"]["kv_bytes_per_step"]
    assert r["floor"]["weight_bytes"] == one_request["floor"]["weight_bytes"]  # a dense model reads it once
    printed = capsys.readouterr().out
    assert "batch 3, input 8, output 4" in printed and "TPOT median" in printed
    assert "GB/s memory" in printed and "TTFT floor" in printed and "TPOT floor" in printed and "achieved" in printed


def test_bench_latency_rejects_bad_lengths(capsys):
    assert main(["bench", "latency", "--output-len", "1"]) == 2
    assert "--output-len must be >= 2" in capsys.readouterr().err
    assert main(["bench", "latency", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
