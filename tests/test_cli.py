"""`gridserve generate` as a real process: prints the completion, and fails clearly on bad input."""

import os
import subprocess
import sys

import pytest

GRIDSERVE = os.path.join(os.path.dirname(sys.executable), "gridserve")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GRIDSERVE, *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_greedy_completion():
    p = run("generate", "The capital of France is", "--no-chat", "--max-new-tokens", "4",
            "--max-total-tokens", "1024", "--no-show-progress")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().startswith("Paris")
    assert " INFO " not in p.stderr  # quiet by default: no scheduler lines between the user and the answer


def test_the_cpu_kv_cache_default_is_sized_from_the_model_and_free_memory():
    from gridserve.model_executor.memory import CPU_KV_BYTES, cpu_kv_capacity

    per_token = 46080  # SmolLM2-135M: 30 layers x K and V x 3 KV heads x 64 x 4 bytes
    tokens, why = cpu_kv_capacity(per_token)
    assert 256 <= tokens and tokens * per_token <= CPU_KV_BYTES  # was 65,536 tokens: 3 GB and ~9 s to zero
    assert "--max-total-tokens" in why and "GiB free" in why


def test_generate_bad_values_fail_with_a_message():
    p = run("generate", "Hi", "--temperature", "-1", "--max-total-tokens", "1024", "--no-show-progress")
    assert p.returncode == 2 and "temperature" in p.stderr
    p = run("generate", "Hi", "--max-total-tokens", "0")
    assert p.returncode == 2 and "error: --max-total-tokens must be > 0" in p.stderr
    assert "Traceback" not in p.stderr
    p = run("generate", "Hi", "--no-such-flag")
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr


def test_serve_rejects_bad_flags_at_once(monkeypatch, capsys):
    import gridserve.launch_server
    from gridserve.cli import main

    def must_not_start(args):
        raise AssertionError(f"started with bad flags: {args}")

    monkeypatch.setattr(gridserve.launch_server, "run", must_not_start)
    for args, message in [
        (["--nnodes", "2"], "--dist-init-addr"),
        (["--node-rank", "1"], "--node-rank must be in [0, --nnodes=1)"),
        (["--port", "70000"], "--port must be in 1..65535"),
        (["--tp-size", "0"], "--tp-size must be >= 1"),
        (["--dtype", "int3"], "invalid choice"),
    ]:
        try:
            code = main(["serve", *args])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        assert code == 2 and message in capsys.readouterr().err, args
    p = run("serve", "--bogus")  # and the real command, as a process
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr, p.stderr


def test_a_model_that_cannot_be_split_fails_before_the_ranks_load():
    p = run("generate", "Hi", "--tp", "2", "--no-show-progress")  # 9 attention heads
    assert p.returncode == 1 and "--tp-size 2 does not divide num_attention_heads 9" in p.stderr
    assert "Traceback" not in p.stderr


def test_launch_server_module_accepts_sglang_flags():
    p = subprocess.run([sys.executable, "-m", "gridserve.launch_server", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0
    for flag in ("--model-path", "--tp-size", "--pp-size", "--dp-size", "--nnodes", "--node-rank",
                 "--dist-init-addr", "--host", "--port", "--mem-fraction-static", "--max-total-tokens",
                 "--chunked-prefill-size", "--max-running-requests", "--disable-radix-cache", "--grpc-mode",
                 "--api-key"):
        assert flag in p.stdout, flag


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from gridserve.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's --help, --version and errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_is_grouped_shows_defaults_and_fits_the_command(capsys):
    import dataclasses

    from gridserve.server_args import GROUPS, ServerArgs

    grouped = [n for names in GROUPS.values() for n in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(ServerArgs))  # each flag in one section
    code, out, _ = _cli(capsys, "serve", "--help")
    assert code == 0 and out.startswith("usage: gridserve serve [options]")
    for title in GROUPS:
        assert f"{title} options:" in out
    assert "(default: 30000)" in out and "(default: cache_aware)" in out and "(default: off)" in out
    code, out, _ = _cli(capsys, "generate", "--help")
    assert code == 0 and "--max-new-tokens" in out and "most tokens to generate (default: 256)" in out
    for server_flag in ("--port", "--api-key", "--grpc-mode", "--host"):  # generate runs no server
        assert server_flag not in out


def test_version_and_a_typo_gets_the_subcommands_usage_and_a_suggestion(capsys):
    import gridserve

    code, out, _ = _cli(capsys, "--version")
    assert code == 0 and out.strip() == f"gridserve {gridserve.__version__}"
    code, _, err = _cli(capsys, "serve", "--modle", "x")
    assert code == 2 and err.startswith("usage: gridserve serve")
    assert "--modle (did you mean --model?)" in err
    code, _, err = _cli(capsys, "generate", "hi", "--max-new-tokns", "3")
    assert code == 2 and "did you mean --max-new-tokens?" in err


def test_cpu_threads_flag_then_omp_num_threads_then_the_cores(monkeypatch):
    import os

    from gridserve.server_args import ServerArgs

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert ServerArgs(cpu_threads=2).threads_per_rank(4) == 2  # the flag wins
    assert ServerArgs().threads_per_rank(4) == 3  # then the user's OMP_NUM_THREADS, whatever the rank count
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert ServerArgs().threads_per_rank(2) == max(1, (os.cpu_count() or 1) // 2)
    with pytest.raises(ValueError, match="--cpu-threads must be > 0"):
        ServerArgs(cpu_threads=0)


def test_attention_backends_come_from_one_registry():
    import torch

    from gridserve.attention.registry import ATTENTION_BACKENDS, make_attention_backend
    from gridserve.attention.torch_backend import TorchAttentionBackend
    from gridserve.server_args import ServerArgs

    assert set(ATTENTION_BACKENDS) == {"torch", "triton"}
    assert isinstance(make_attention_backend("auto", torch.device("cpu")), TorchAttentionBackend)
    with pytest.raises(ValueError, match="--attention-backend must be one of auto, torch, triton; got 'flash'"):
        make_attention_backend("flash", torch.device("cpu"))  # never silently the torch backend
    with pytest.raises(ValueError, match="--attention-backend must be one of"):
        ServerArgs(attention_backend="flash")


def test_a_taken_port_fails_before_any_child_process_starts():
    import socket
    import time

    from tests.server_utils import free_port

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        start = time.monotonic()
        p = run("serve", "--port", str(port), "--log-level", "info")
    assert p.returncode == 1 and f"--port {port}: cannot listen on 127.0.0.1:{port}" in p.stderr, p.stderr
    assert "starts ranks" not in p.stderr and "Traceback" not in p.stderr  # nothing was spawned
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent"], "--model-path: model '/nonexistent' is neither a Hugging Face model folder"),
    (["--device", "cuda"], "--device cuda: this torch"),
])
def test_common_mistakes_are_one_line_errors(args, message):
    import torch

    if args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = run("generate", "Hi", "--max-total-tokens", "256", "--no-show-progress", *args)
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
