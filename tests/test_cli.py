"""`gridserve generate` as a real process: prints the completion, and fails clearly on bad input."""

import os
import subprocess
import sys

GRIDSERVE = os.path.join(os.path.dirname(sys.executable), "gridserve")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GRIDSERVE, *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_greedy_completion():
    p = run("generate", "The capital of France is", "--no-chat", "--max-new-tokens", "4",
            "--max-total-tokens", "1024", "--no-show-progress")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith("Paris")


def test_generate_bad_values_fail_with_a_message():
    p = run("generate", "Hi", "--temperature", "-1", "--max-total-tokens", "1024", "--no-show-progress")
    assert p.returncode == 2 and "temperature" in p.stderr
    p = run("generate", "Hi", "--max-total-tokens", "0")
    assert p.returncode == 2 and "error: --max-total-tokens must be > 0" in p.stderr
    assert "Traceback" not in p.stderr
    p = run("generate", "Hi", "--no-such-flag")
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr
