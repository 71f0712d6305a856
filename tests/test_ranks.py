"""Rank and GPU mapping: global rank = dp offset + pp_rank * tp + tp_rank, contiguous per node."""

import pytest

from gridserve.distributed.ranks import node_ranks


def test_tp_pp_grid_on_one_node():
    ranks = node_ranks(tp=2, pp=2, dp=1)
    assert [(r.pp_rank, r.tp_rank, r.global_rank, r.gpu_id) for r in ranks] == [
        (0, 0, 0, 0), (0, 1, 1, 1), (1, 0, 2, 2), (1, 1, 3, 3)]
    assert ranks[3].name == "dp0 pp1 tp1"


def test_nodes_dp_and_gpu_offsets():
    node1 = node_ranks(tp=2, pp=1, dp=2, nnodes=2, node_rank=1, base_gpu_id=4, gpu_id_step=2)
    assert [(r.dp_rank, r.tp_rank, r.global_rank, r.local_rank, r.gpu_id) for r in node1] == [
        (1, 0, 2, 0, 4), (1, 1, 3, 1, 6)]
    with pytest.raises(ValueError, match="cannot be spread evenly over 4 nodes"):
        node_ranks(tp=3, pp=1, dp=1, nnodes=4)
