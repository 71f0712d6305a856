"""`gridserve bench latency` on the embedded model: runs, and reports TTFT, TPOT and their floors in its JSON."""

import json

from gridserve.cli import main


def test_bench_latency_reports_ttft_and_tpot(tmp_path, capsys):
    out = tmp_path / "lat.json"
    rc = main(["bench", "latency", "--input-len", "8", "--output-len", "4", "--num-runs", "1",
               "--max-total-tokens", "1024", "--no-show-progress", "--output-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["ttft_ms_median"] > 0 and r["tpot_ms_median"] > 0
    f = r["floor"]
    assert f["rates"]["mem_bw"] > 0 and f["rates"]["matmul_flops"] > 0
    assert 0 < f["tpot_ms"] <= r["tpot_ms_median"] and 0 < f["ttft_ms"] <= r["ttft_ms_median"]
    assert f["tpot_fraction"] == f["tpot_ms"] / r["tpot_ms_median"]
    printed = capsys.readouterr().out
    assert "TPOT median" in printed
    assert "GB/s memory" in printed and "TTFT floor" in printed and "TPOT floor" in printed and "achieved" in printed


def test_bench_latency_sends_a_batch_at_once(tmp_path, capsys):
    """--batch-size 3: three streamed requests at once, each checked for all its tokens; the floor reads the KV of
    three and prefills three prompts."""
    out, one = tmp_path / "lat3.json", tmp_path / "lat1.json"
    common = ["bench", "latency", "--input-len", "8", "--output-len", "4", "--num-runs", "1",
              "--max-total-tokens", "1024", "--no-show-progress"]
    assert main([*common, "--batch-size", "3", "--output-json", str(out)]) == 0
    assert main([*common, "--output-json", str(one)]) == 0
    r, r1 = json.loads(out.read_text()), json.loads(one.read_text())
    assert r["batch_size"] == 3 and r1["batch_size"] == 1
    assert r["floor"]["kv_bytes_per_step"] == 3 * r1["floor"]["kv_bytes_per_step"]
    assert r["floor"]["weight_bytes"] == r1["floor"]["weight_bytes"]  # a dense model reads its weights once
    assert "batch 3, input 8, output 4" in capsys.readouterr().out


def test_bench_latency_rejects_bad_lengths(capsys):
    assert main(["bench", "latency", "--output-len", "1"]) == 2
    assert "--output-len must be >= 2" in capsys.readouterr().err
    assert main(["bench", "latency", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err
