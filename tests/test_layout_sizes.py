"""NVLink buffer sizing of the intranode kernels, checked on CPU through ep_comm._C.

The offsets the kernels use and the sizes the host checks come from one header
(csrc/kernels/common/intranode_layout.cuh); these tests hold that function to its promises:
regions in order and aligned, sizes monotone, and the size hint covering every call it should.
Skipped when the extension is not built.
"""
from __future__ import annotations

import itertools

import pytest

from ep_comm import _ext
from ep_comm.config import Config, combine_config, dispatch_config

_C = _ext.load()
pytestmark = pytest.mark.skipif(_C is None or not hasattr(_C, "intranode_buffer_bytes"),
                                reason="ep_comm._C with intranode kernels is not built")

HIDDENS = [128, 256, 2048, 4096, 7168]
RANKS = [1, 2, 3, 4, 8]


def test_layout_function_is_what_config_uses():
    cfg = Config()
    for hidden, ranks in itertools.product(HIDDENS, RANKS):
        assert _ext.layout_function("intranode_buffer_bytes") is not None
        assert cfg.get_nvl_buffer_size_hint(hidden * 2, ranks) == _C.intranode_buffer_bytes(
            hidden * 2, ranks, cfg.num_channels, cfg.num_max_nvl_chunked_recv_tokens)


def test_buffer_bytes_monotone_in_every_argument():
    base = dict(hidden_bytes=4096, num_ranks=4, num_channels=10, num_max_nvl_chunked_recv_tokens=64)
    steps = dict(hidden_bytes=16, num_ranks=1, num_channels=1, num_max_nvl_chunked_recv_tokens=1)
    for name, step in steps.items():
        sizes = []
        for i in range(6):
            args = dict(base)
            args[name] += i * step
            sizes.append(_C.intranode_buffer_bytes(**args))
        assert all(a < b for a, b in zip(sizes, sizes[1:])), (name, sizes)


def test_regions_are_ordered_aligned_and_disjoint():
    for ranks, channels, slots, slot_bytes in itertools.product(RANKS, [1, 3, 10, 64], [2, 17, 256], [16, 272, 14592]):
        off = _C.intranode_layout_offsets(ranks, channels, slots, slot_bytes)
        order = ["started", "notify_channel", "notify_expert", "tail", "head", "slots"]
        starts = [off[k] for k in order]
        assert all(s % 128 == 0 for s in starts), off
        # Each region holds what the kernels put there: 2*R u64 rendezvous words (one per epoch
        # parity), R*C u64 counts, R*1024 expert counts, R*C tails, R*C heads.
        sizes = [2 * ranks * 8, ranks * channels * 8, ranks * _C.INTRANODE_MAX_LOCAL_EXPERTS * 8,
                 ranks * channels * 8, ranks * channels * 8]
        for begin, size, nxt in zip(starts, sizes, starts[1:]):
            assert begin + size <= nxt, off
        assert off["slot_bytes"] % 16 == 0 and off["slot_bytes"] >= slot_bytes
        assert off["ring_bytes"] == slots * off["slot_bytes"]
        assert off["total"] >= off["slots"] + ranks * channels * off["ring_bytes"]
        assert off["total"] == _C.intranode_layout_bytes(ranks, channels, slots, slot_bytes)


def test_slot_sizes_hold_their_payload():
    for hidden_bytes, scales, topk in itertools.product([16, 256, 7168, 14336], [0, 1, 56], [0, 1, 8, 32]):
        d = _C.intranode_dispatch_slot_bytes(hidden_bytes, scales, topk)
        assert d % 16 == 0 and d >= hidden_bytes + 4 * scales + 8 * topk
    for hidden_bytes, topk in itertools.product([16, 256, 14336], [0, 1, 9, 32]):
        c = _C.intranode_combine_slot_bytes(hidden_bytes, topk)
        assert c % 16 == 0 and c >= hidden_bytes + 4 * topk


def test_hint_covers_every_call_it_promises():
    """A buffer sized with the hint for bf16 rows serves bf16 and FP8 dispatch with up to 32 top-k and
    the bf16 combine, with the default dispatch and combine configs of that rank count."""
    for hidden, ranks in itertools.product(HIDDENS, RANKS):
        for cfg in (dispatch_config(ranks, 20), combine_config(ranks, 20), dispatch_config(ranks, 24)):
            hint = cfg.get_nvl_buffer_size_hint(hidden * 2, ranks)
            channels, slots = cfg.num_channels, cfg.num_max_nvl_chunked_recv_tokens
            calls = [
                _C.intranode_dispatch_slot_bytes(hidden * 2, 0, 32),            # bf16
                _C.intranode_dispatch_slot_bytes(hidden, hidden // 128, 32),    # FP8 + scales
                _C.intranode_dispatch_slot_bytes(hidden * 2, 0, 0),             # cached
                _C.intranode_combine_slot_bytes(hidden * 2, 32),                # combine + weights
            ]
            for slot_bytes in calls:
                assert _C.intranode_layout_bytes(ranks, channels, slots, slot_bytes) <= hint


def test_buffer_without_gpu_raises_cleanly():
    if _C.device_count() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError):
        _C.IntranodeBuffer(0, 2, 0, 1 << 20)
    with pytest.raises(RuntimeError, match="ranks"):
        _C.IntranodeBuffer(0, 9, 0, 1 << 20)
