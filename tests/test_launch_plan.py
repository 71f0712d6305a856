"""The launch plan by role and `gridserve serve --dry-run`: every node's ranks, GPUs and processes, printed
without importing torch or starting anything."""

import subprocess
import sys

import pytest

from gridserve.cli import main
from gridserve.launch_plan import LaunchPlan
from gridserve.server_args import ServerArgs

ADDR = ["--dist-init-addr", "192.0.2.1:5000"]


def _nodes(printed: str) -> list[list[tuple[int, int, int, int, int]]]:
    """(global, dp, pp, tp, GPU) of every rank line, per node block of the dry-run output."""
    nodes = []
    for line in printed.splitlines():
        if line.startswith("node "):
            nodes.append([])
        elif line.strip()[:1].isdigit():
            nodes[-1].append(tuple(int(x) for x in line.split()[:5]))
    return nodes


@pytest.mark.parametrize("flags, want", [
    # tp 8 x pp 2 on 2 nodes: one pipeline stage per node, its 8 TP ranks on GPUs 0-7
    (["--tp", "8", "--pp", "2", "--nnodes", "2"],
     [[(t, 0, 0, t, t) for t in range(8)], [(8 + t, 0, 1, t, t) for t in range(8)]]),
    # dp 2 x tp 4 on 2 nodes: one replica per node
    (["--dp", "2", "--tp", "4", "--nnodes", "2"],
     [[(t, 0, 0, t, t) for t in range(4)], [(4 + t, 1, 0, t, t) for t in range(4)]]),
    # dp 4 x tp 2 on 4 nodes, from GPU 2 in steps of 2
    (["--dp", "4", "--tp", "2", "--nnodes", "4", "--base-gpu-id", "2", "--gpu-id-step", "2"],
     [[(2 * n + t, n, 0, t, 2 + 2 * t) for t in range(2)] for n in range(4)]),
    # tp 2 across 2 nodes: a replica may span nodes
    (["--tp", "2", "--nnodes", "2"], [[(0, 0, 0, 0, 0)], [(1, 0, 0, 1, 0)]]),
])
def test_dry_run_maps(flags, want, capsys):
    assert main(["serve", *flags, *ADDR, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert _nodes(printed) == want
    blocks = printed.split("\nnode ")[1:]
    assert "TokenizerManager" in blocks[0] and "gridserve::detokenizer" in blocks[0]
    assert ("gridserve::dp_controller" in blocks[0]) == ("--dp" in flags)
    for block in blocks[1:]:  # nodes > 0 run only their schedulers
        assert "detokenizer" not in block and "dp_controller" not in block and "TokenizerManager" not in block
        assert "/health" in block


def test_bad_layouts_fail_with_the_start_up_messages(capsys):
    assert main(["serve", "--tp", "3", "--nnodes", "4", *ADDR, "--dry-run"]) == 2
    assert "tp * pp * dp = 3 ranks cannot be spread evenly over 4 nodes" in capsys.readouterr().err
    assert main(["serve", "--tp", "2", "--nnodes", "2", "--dry-run"]) == 2
    assert "--nnodes > 1 needs --dist-init-addr" in capsys.readouterr().err


def test_dry_run_imports_no_torch():
    code = ("import sys; from gridserve.cli import main; "
            "rc = main(['serve', '--dp', '2', '--tp', '4', '--nnodes', '2', '--dist-init-addr', '192.0.2.1:5000', "
            "'--dry-run']); sys.exit(rc or 3 * ('torch' in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "node 1:" in p.stdout


def test_the_launcher_spawns_before_it_imports_torch():
    """torch (and the models) load in the children and, while they import, in the start-up checks: the serve
    command's own import chain must not pull them in first (seconds of start-up on a GPU machine)."""
    code = "import sys, gridserve.cli, gridserve.launch_server; sys.exit(3 * ('torch' in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_plan_by_role():
    plan = LaunchPlan.for_node(ServerArgs(dp_size=2, tp_size=2))
    assert [r.name for r in plan.ranks] == ["dp0 pp0 tp0", "dp0 pp0 tp1", "dp1 pp0 tp0", "dp1 pp0 tp1"]
    assert [r.replica_rank for r in plan.ranks] == [0, 1, 0, 1]
    assert plan.detokenizer and plan.dp_controller and plan.tokenizer_manager
    assert plan.process_titles()[-2:] == ["gridserve::detokenizer", "gridserve::dp_controller"]
    assert not LaunchPlan.for_node(ServerArgs(tp_size=2)).dp_controller


@pytest.mark.parametrize("device, gpu_modules", [("cpu", False), ("cuda", True)])
def test_a_rank_prepares_while_the_launcher_checks(device, gpu_modules):
    """While the launcher runs its checks, a GPU rank imports the Triton kernels and makes its CUDA context; a CPU
    rank does neither. On a machine without the GPU asked for, preparing raises nothing: the checks report it."""
    code = f"""
import sys, time
from gridserve.launch_plan import LaunchPlan
from gridserve.scheduler.run import prepare_during_checks
from gridserve.server_args import ServerArgs
args = ServerArgs(device="{device}")
before = time.monotonic()
done = prepare_during_checks(args, LaunchPlan.for_node(args).ranks[0])
assert before <= done <= time.monotonic()
print("triton" in sys.modules, "gridserve.layers.decode_gemm" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(gpu_modules)] * 2
