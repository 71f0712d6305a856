"""`gridserve bench latency` on the embedded model: runs, and reports TTFT and TPOT in its JSON."""

import json

from gridserve.cli import main


def test_bench_latency_reports_ttft_and_tpot(tmp_path, capsys):
    out = tmp_path / "lat.json"
    rc = main(["bench", "latency", "--input-len", "8", "--output-len", "4", "--num-runs", "1",
               "--max-total-tokens", "1024", "--no-show-progress", "--output-json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["ttft_ms_median"] > 0 and r["tpot_ms_median"] > 0
    assert "TPOT median" in capsys.readouterr().out


def test_bench_latency_rejects_bad_lengths(capsys):
    assert main(["bench", "latency", "--output-len", "1"]) == 2
    assert "--output-len must be >= 2" in capsys.readouterr().err
