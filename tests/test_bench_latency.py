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


def test_bench_latency_rejects_bad_lengths(capsys):
    assert main(["bench", "latency", "--output-len", "1"]) == 2
    assert "--output-len must be >= 2" in capsys.readouterr().err
