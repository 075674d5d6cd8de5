"""Low-latency buffer sizing, checked on CPU through ep_comm._C.

The kernels address the symmetric buffer and the host sizes it with one function
(csrc/kernels/common/low_latency_layout.cuh); these tests hold it to its promises: regions in order,
aligned and disjoint, big enough for every message, the size hint equal to it, and bad sizes
rejected with ValueError. Skipped when the extension is not built.
"""
from __future__ import annotations

import itertools

import pytest

from ep_comm import _ext
from ep_comm.buffer import Buffer

_C = _ext.load()
pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "low_latency_buffer_bytes"),
                                reason="ep_comm._C with the low-latency kernels is not built")

TOKENS = [1, 7, 128, 512]
HIDDENS = [8, 264, 512, 2048, 7168]
RANK_EXPERTS = [(1, 1), (2, 4), (3, 9), (8, 256), (16, 64)]


def _regions(layout: dict):
    """(name, offset, size) of every region, in address order."""
    r, e, t, slot = layout["num_ranks"], layout["num_experts"], layout["num_max_tokens"], layout["slot_bytes"]
    el = layout["experts_per_rank"]
    return [
        ("ack", layout["ack_offset"], 2 * r * 8),
        ("dispatch_count", layout["dispatch_count_offset"], 2 * el * r * 8),
        ("dispatch_arrived", layout["dispatch_arrived_offset"], 2 * el * r * 8),
        ("combine_arrived", layout["combine_arrived_offset"], 2 * e * 8),
        ("dispatch_staging", layout["dispatch_staging_offset"], t * slot),
        ("combine_staging", layout["combine_staging_offset"], el * r * t * slot),
        ("recv_0", layout["recv_offset_0"], layout["recv_half_bytes"]),
        ("recv_1", layout["recv_offset_1"], layout["recv_half_bytes"]),
    ]


@pytest.mark.parametrize("tokens,hidden,ranks_experts", itertools.product(TOKENS, HIDDENS, RANK_EXPERTS))
def test_regions_are_ordered_disjoint_and_fit(tokens, hidden, ranks_experts):
    ranks, experts = ranks_experts
    layout = _C.low_latency_layout(tokens, hidden, ranks, experts)
    total = _C.low_latency_buffer_bytes(tokens, hidden, ranks, experts)
    assert layout["total_bytes"] == total
    regions = _regions(layout)
    end = 0
    for name, offset, size in regions:
        assert offset >= end, f"{name} overlaps the region before it"
        end = offset + size
    assert end <= total
    assert layout["ack_offset"] == 0                    # never moves when T, H or E change
    for name in ("dispatch_staging", "combine_staging", "recv_0", "recv_1"):
        offset = dict((n, o) for n, o, _ in regions)[name]
        assert offset % 128 == 0, f"{name} is not 128-byte aligned"
    assert layout["control_bytes"] <= layout["dispatch_staging_offset"]
    # A slot holds the largest message: a bf16 row, or an FP8 row with its float32 scales.
    slot = layout["slot_bytes"]
    assert slot % 16 == 0 and slot >= hidden * 2
    if hidden % 128 == 0:
        assert slot >= hidden + hidden // 128 * 4
    # Dispatch uses a half as [E_local][R][T] messages, combine as [E][T] rows: same count.
    assert layout["recv_half_bytes"] >= experts * tokens * slot


def test_size_hint_is_the_layout_function():
    for tokens, hidden, (ranks, experts) in itertools.product(TOKENS, HIDDENS, RANK_EXPERTS):
        assert _ext.layout_function("low_latency_buffer_bytes") is not None
        assert Buffer.get_low_latency_rdma_size_hint(tokens, hidden, ranks, experts) == \
            _C.low_latency_buffer_bytes(tokens, hidden, ranks, experts)


def test_size_grows_with_every_argument():
    base = dict(num_max_dispatch_tokens_per_rank=64, hidden=1024, num_ranks=4, num_experts=32)
    size = _C.low_latency_buffer_bytes(**base)
    for key, bigger in (("num_max_dispatch_tokens_per_rank", 65), ("hidden", 1032), ("num_experts", 36)):
        assert _C.low_latency_buffer_bytes(**{**base, key: bigger}) > size, key


def test_known_value():
    # DeepSeek-V3-like decode: T=128, H=7168, 8 ranks, 256 experts. The combine staging area and
    # the two receive halves are E*T rows of 2*H bytes each; the dispatch staging is T such rows.
    tokens, hidden, ranks, experts = 128, 7168, 8, 256
    rows = experts * tokens * hidden * 2
    staging = tokens * hidden * 2
    total = _C.low_latency_buffer_bytes(tokens, hidden, ranks, experts)
    assert 3 * rows + staging < total < 3 * rows + staging + (64 << 10)


@pytest.mark.parametrize("args", [(0, 1024, 2, 4), (8, 0, 2, 4), (8, 1020, 2, 4), (8, 1024, 0, 4),
                                  (8, 1024, 2, 0), (8, 1024, 3, 4)])
def test_bad_sizes_raise_value_error(args):
    with pytest.raises(ValueError, match="low_latency_buffer_bytes"):
        _C.low_latency_buffer_bytes(*args)
