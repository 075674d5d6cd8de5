"""Sizing of the internode buffer (csrc/kernels/common/internode_layout.cuh through ep_comm._C), on CPU.

The same layout function sizes the buffer on the host and addresses it in the kernels, so checking
it here covers what the kernels will index, without a GPU.
"""
from __future__ import annotations

import pytest

from ep_comm import _ext
from ep_comm.config import Config

C = _ext.load()
pytestmark = pytest.mark.skipif(C is None or not hasattr(C, "internode_rdma_buffer_bytes"),
                                reason="ep_comm._C is not built")

HIDDEN_BYTES = 7168 * 2


def _bytes(hidden_bytes=HIDDEN_BYTES, num_ranks=16, channels=10, tokens=128, ranks_per_node=8):
    return C.internode_rdma_buffer_bytes(hidden_bytes, num_ranks, channels, tokens, ranks_per_node)


def test_monotonic_in_every_size():
    base = _bytes()
    assert base > 0 and base % 128 == 0
    assert _bytes(hidden_bytes=HIDDEN_BYTES * 2) > base
    assert _bytes(num_ranks=32) > base
    assert _bytes(channels=12) > base
    assert _bytes(tokens=256) > base
    # More nodes of the same size need more RDMA rings; finer nodes at a fixed rank count too.
    assert _bytes(num_ranks=16, ranks_per_node=4) > base
    for hidden in (256, 1024, 4096, 7168):
        sizes = [_bytes(hidden_bytes=hidden * 2, tokens=t) for t in (2, 8, 64, 256)]
        assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def test_single_node_needs_no_rdma_buffer():
    assert C.internode_rdma_buffer_bytes(HIDDEN_BYTES, 8, 10, 128, 8) == 0
    assert C.internode_rdma_buffer_bytes(HIDDEN_BYTES, 4, 10, 128, 4) == 0
    assert C.internode_rdma_buffer_bytes(HIDDEN_BYTES, 4, 10, 128, 2) > 0


def test_ranks_per_node_from_environment(monkeypatch):
    monkeypatch.setenv("EP_COMM_RANKS_PER_NODE", "2")
    assert C.internode_rdma_buffer_bytes(HIDDEN_BYTES, 8, 10, 128) == _bytes(num_ranks=8, ranks_per_node=2)
    assert Config(num_sms=20).get_rdma_buffer_size_hint(HIDDEN_BYTES, 8) == _bytes(num_ranks=8, channels=10,
                                                                                   tokens=256, ranks_per_node=2)
    monkeypatch.delenv("EP_COMM_RANKS_PER_NODE")
    assert C.internode_rdma_buffer_bytes(HIDDEN_BYTES, 16, 10, 128) == _bytes(num_ranks=16, ranks_per_node=8)


def test_layout_regions_are_ordered_and_fill_the_total():
    for num_ranks, rpn in ((4, 2), (8, 4), (8, 2), (16, 8), (24, 3)):
        lay = C.internode_layout(512, num_ranks, 3, 8, rpn)
        keys = ["notify_recv_begin", "nvl_tail_begin", "rdma_arrival_begin", "rdma_send_begin", "rdma_recv_begin",
                "nvl_ring_begin", "total_bytes"]
        offsets = [lay[k] for k in keys]
        assert offsets == sorted(offsets), lay
        assert all(o % 128 == 0 for o in offsets)
        nodes = num_ranks // rpn
        assert lay["num_nodes"] == nodes
        assert lay["rdma_recv_begin"] - lay["rdma_send_begin"] == nodes * 3 * lay["rdma_ring_bytes"]
        assert lay["total_bytes"] - lay["nvl_ring_begin"] == num_ranks * 3 * lay["nvl_ring_bytes"]
        assert lay["total_bytes"] == C.internode_rdma_buffer_bytes(512, num_ranks, 3, 8, rpn)


def test_too_small_buffer_names_the_size_needed():
    needed = _bytes(num_ranks=8, channels=2, tokens=4, ranks_per_node=4)
    assert C.internode_check_buffer(needed, HIDDEN_BYTES, 8, 4, 2, 4) == needed
    with pytest.raises(RuntimeError, match=rf"num_rdma_bytes >= {needed}, but it is {needed - 1}"):
        C.internode_check_buffer(needed - 1, HIDDEN_BYTES, 8, 4, 2, 4)


def test_invalid_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        C.internode_rdma_buffer_bytes(100, 8, 2, 4, 2)
    with pytest.raises(ValueError, match="must divide"):
        C.internode_rdma_buffer_bytes(512, 6, 2, 4, 4)
    with pytest.raises(ValueError, match="num_channels"):
        C.internode_rdma_buffer_bytes(512, 8, C.INTERNODE_MAX_CHANNELS + 1, 4, 2)
    with pytest.raises(ValueError, match="num_max_rdma_chunked_recv_tokens"):
        C.internode_rdma_buffer_bytes(512, 8, 2, 16385, 2)
    with pytest.raises(ValueError, match="ranks per node"):
        C.internode_rdma_buffer_bytes(512, 2 * (C.INTERNODE_MAX_LOCAL_RANKS + 1), 2, 4,
                                      C.INTERNODE_MAX_LOCAL_RANKS + 1)
