"""One contract: the reference backend refuses what the kernels refuse, with the same exception type
and the same key words. The same cases run on the reference and on the emulated kernels (intranode
and low-latency; internode's refusals are checked in tests/gpu/test_internode.py), 2 gloo ranks each.
"""
from __future__ import annotations

import pytest

import ep_comm
from ep_comm import _ext
from ep_comm.config import Config
from ep_comm.testing import make_inputs
from dist import run_ranks

needs_emulator = pytest.mark.skipif(not _ext.emulated_available(),
                                    reason=f"ep_comm._C_emu is not built: {_ext.emulated_unavailable_reason()}")
HIDDEN = 128
TOKENS = 8
SEED = 20261207
BACKENDS = ["reference", pytest.param("emulated", marks=needs_emulator)]


def _low_latency_buffer(group, kind: str, world: int, num_experts: int):
    size = ep_comm.Buffer.get_low_latency_rdma_size_hint(2 * TOKENS, 2 * HIDDEN, world, num_experts)
    return ep_comm.Buffer(group, 0, size, low_latency_mode=True, backend=kind)


def _low_latency_refusals_body(rank, world, group, kind):
    num_experts = 2 * world
    buffer = _low_latency_buffer(group, kind, world, num_experts)
    try:
        mine = make_inputs(SEED, rank, TOKENS, HIDDEN, 2, num_experts)
        recv_x, _, handle, _, _ = buffer.low_latency_dispatch(mine.x, mine.topk_idx, TOKENS, num_experts,
                                                              use_fp8=False)
        buffer.low_latency_combine(recv_x, mine.topk_idx, mine.topk_weights, handle)
        # Other sizes without clean_low_latency_buffer first: refused on every backend, every rank.
        for sizes in ((2 * TOKENS, HIDDEN), (TOKENS, 2 * HIDDEN)):
            wide = make_inputs(SEED, rank, TOKENS, sizes[1], 2, num_experts)
            with pytest.raises(ValueError, match=r"laid out for .*clean_low_latency_buffer"):
                buffer.low_latency_dispatch(wide.x, wide.topk_idx, sizes[0], num_experts, use_fp8=False)
        # After the refusals the buffer still serves its layout, and a clean allows the new one.
        buffer.low_latency_dispatch(mine.x, mine.topk_idx, TOKENS, num_experts, use_fp8=False)
        buffer.clean_low_latency_buffer(2 * TOKENS, HIDDEN, num_experts)
        recv_x, count, _, _, _ = buffer.low_latency_dispatch(mine.x, mine.topk_idx, 2 * TOKENS, num_experts,
                                                             use_fp8=False)
        assert recv_x.shape[1] == 2 * TOKENS * world
    finally:
        buffer.destroy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_size_change_needs_clean(backend):
    run_ranks(_low_latency_refusals_body, 2, timeout_s=120, kind=backend)


def _normal_refusals_body(rank, world, group, kind):
    num_experts = 2 * world
    config = Config(num_sms=2, num_max_nvl_chunked_send_tokens=2, num_max_nvl_chunked_recv_tokens=8)
    nvl = config.get_nvl_buffer_size_hint(HIDDEN * 2, world)
    buffer = ep_comm.Buffer(group, num_nvl_bytes=nvl if kind == "emulated" else 0, backend=kind)
    try:
        mine = make_inputs(SEED, rank, TOKENS, HIDDEN, 2, num_experts)
        layout = buffer.get_dispatch_layout(mine.topk_idx, num_experts)
        kwargs = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                      config=config)
        # Hidden size that differs on one rank: refused on every rank, naming it.
        x = make_inputs(SEED, rank, TOKENS, 2 * HIDDEN, 2, num_experts).x if rank == 1 else mine.x
        with pytest.raises(ep_comm.EpCommMismatch,
                           match=f"rank 0 called dispatch with hidden={HIDDEN}, rank 1 with hidden={2 * HIDDEN}"):
            buffer.dispatch(x, topk_idx=mine.topk_idx, **kwargs)
        # The buffer serves the next matched call.
        buffer.dispatch(mine.x, topk_idx=mine.topk_idx, **kwargs)
    finally:
        buffer.destroy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatch_refused_alike(backend):
    run_ranks(_normal_refusals_body, 2, timeout_s=120, kind=backend)
