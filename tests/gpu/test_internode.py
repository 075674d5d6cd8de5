"""Internode kernels (NVSHMEM between nodes, NVLink inside) against the reference backend.

All ranks run as processes on one GPU (or on the emulated device) over a gloo group; each declares
a virtual node size with EP_COMM_RANKS_PER_NODE before creating its Buffers (4 ranks as 2x2, 8 as
2x4 and 4x2). On a GPU the "RDMA" leg goes through NVSHMEM over P2P; on the emulator nvshmem_ptr is
NULL across emulated nodes, so it takes the put path (puts and signals delivered late and out of
order by the emulated network) and the NVLink leg uses nvshmem_ptr stores. Each rank feeds the
kernels and a reference Buffer the same seeded inputs: layout and dispatch must match bit for bit;
combine sums hierarchically (within a node, then across nodes) and so matches within calc_diff 5e-6,
deterministically.

On a GPU the ranks' kernels time-slice, so sizes stay small.
"""
from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch
import torch.distributed as dist

import ep_comm
from ep_comm import fp8
from ep_comm.config import Config
from ep_comm.testing import make_inputs
from common import (DEVICE_TIMEOUT_S, GPU_TEST, KERNELS, close, exact, run_ranks, setup_device,
                    split, synchronize)

pytestmark = GPU_TEST

HIDDEN = 256
SEED = 20261125
# Tiny rings (4 RDMA slots, 2 NVL slots) make every ring wrap many times; the second config is
# roomier and has another channel count, so the token split changes between calls on one buffer.
CONFIGS = [
    Config(num_sms=4, num_max_nvl_chunked_send_tokens=2, num_max_nvl_chunked_recv_tokens=8,
           num_max_rdma_chunked_send_tokens=2, num_max_rdma_chunked_recv_tokens=4),
    Config(num_sms=6, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=64,
           num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=64),
]


def _tokens(rank: int, world: int, base: int) -> int:
    """Uneven token counts; the last rank has none."""
    return 0 if rank == world - 1 else base + 5 * rank


def _check_config(rank, world, kernels, reference, config, seed, device):
    num_experts = 4 * world
    num_topk = min(6, num_experts)
    mine = make_inputs(seed, rank, _tokens(rank, world, 19), HIDDEN, num_topk, num_experts, masked_fraction=0.2)
    gpu = lambda t: None if t is None else t.to(device)  # noqa: E731

    # Layout, num_tokens_per_rdma_rank included.
    got = kernels.get_dispatch_layout(gpu(mine.topk_idx), num_experts)
    want = reference.get_dispatch_layout(mine.topk_idx, num_experts)
    for name, g, w in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                           "is_token_in_rank"), got[:4], want[:4]):
        assert w is not None, name
        exact(name, g, w, seed)
    k_layout = dict(num_tokens_per_rank=got[0], num_tokens_per_rdma_rank=got[1], num_tokens_per_expert=got[2],
                    is_token_in_rank=got[3])
    r_layout = dict(num_tokens_per_rank=want[0], num_tokens_per_rdma_rank=want[1], num_tokens_per_expert=want[2],
                    is_token_in_rank=want[3])

    # Dispatch: bf16 and FP8, two alignments.
    for use_fp8 in (False, True):
        x_cpu = fp8.per_token_cast_to_fp8(mine.x) if use_fp8 else mine.x
        x_gpu = tuple(gpu(t) for t in x_cpu) if use_fp8 else gpu(x_cpu)
        for alignment in (1, 4):
            k = kernels.dispatch(x_gpu, topk_idx=gpu(mine.topk_idx), topk_weights=gpu(mine.topk_weights),
                                 expert_alignment=alignment, config=config, **k_layout)
            r = reference.dispatch(x_cpu, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights,
                                   expert_alignment=alignment, config=config, **r_layout)
            tag = f"fp8={use_fp8} align={alignment} cfg={config.num_sms}"
            for part, (g, w) in enumerate(zip(split(k[0]), split(r[0]))):
                exact(f"recv_x[{part}] {tag}", g, w, seed)
            exact(f"recv_topk_idx {tag}", k[1], r[1], seed)
            exact(f"recv_topk_weights {tag}", k[2], r[2], seed)
            exact(f"num_recv_tokens_per_expert_list {tag}", k[3], r[3], seed)

    # Dispatch without weights (recv weights None), then the one whose handle combine uses.
    k = kernels.dispatch(gpu(mine.x), topk_idx=gpu(mine.topk_idx), config=config, **k_layout)
    r = reference.dispatch(mine.x, topk_idx=mine.topk_idx, config=config, **r_layout)
    assert k[2] is None and r[2] is None
    exact("recv_x (no weights)", k[0], r[0], seed)
    k = kernels.dispatch(gpu(mine.x), topk_idx=gpu(mine.topk_idx), topk_weights=gpu(mine.topk_weights),
                         config=config, **k_layout)
    r = reference.dispatch(mine.x, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, config=config, **r_layout)
    k_handle, r_handle = k[4], r[4]
    num_recv = r[0].shape[0]

    # num_worst_tokens: exactly that many rows, padding -1 / 0, empty list, no host sync.
    worst = num_recv + 7
    kw = kernels.dispatch(gpu(mine.x), topk_idx=gpu(mine.topk_idx), topk_weights=gpu(mine.topk_weights),
                          num_worst_tokens=worst, config=config, **k_layout)
    rw = reference.dispatch(mine.x, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, num_worst_tokens=worst,
                            config=config, **r_layout)
    assert kw[0].shape[0] == worst and kw[3] == []
    for name, g, w in (("recv_x worst", kw[0], rw[0]), ("recv_topk_idx worst", kw[1], rw[1]),
                       ("recv_topk_weights worst", kw[2], rw[2])):
        exact(name, g, w, seed)

    # Cached dispatch with new data, bf16 and FP8.
    x2 = (mine.x.float() * -2).to(torch.bfloat16)
    kc = kernels.dispatch(gpu(x2), handle=k_handle, config=config)
    rc = reference.dispatch(x2, handle=r_handle, config=config)
    assert kc[1:5] == (None, None, None, None)
    exact("cached recv_x", kc[0], rc[0], seed)
    x2_fp8 = fp8.per_token_cast_to_fp8(x2)
    kc = kernels.dispatch(tuple(gpu(t) for t in x2_fp8), handle=k_handle, config=config)
    rc = reference.dispatch(x2_fp8, handle=r_handle, config=config)
    for part, (g, w) in enumerate(zip(split(kc[0]), split(rc[0]))):
        exact(f"cached fp8 recv_x[{part}]", g, w, seed)

    # Combine: rows scaled by (rank + 1), with and without weights and biases.
    expert_out = (r[0].float() * (rank + 1)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed + 7 * rank)
    n = mine.x.shape[0]
    bias = (torch.randn(n, HIDDEN, generator=g).to(torch.bfloat16), torch.randn(n, HIDDEN, generator=g).to(torch.bfloat16))
    for use_weights in (False, True):
        for num_bias in (0, 1, 2):
            kb = tuple(gpu(b) for b in bias[:num_bias]) or None
            rb = bias[:num_bias] or None
            kx, kwts, _ = kernels.combine(gpu(expert_out), k_handle, topk_weights=gpu(r[2]) if use_weights else None,
                                          bias=kb, config=config)
            rx, rwts, _ = reference.combine(expert_out, r_handle, topk_weights=r[2] if use_weights else None,
                                            bias=rb, config=config)
            tag = f"weights={use_weights} bias={num_bias} cfg={config.num_sms}"
            close(f"combined_x {tag}", kx, rx, seed)
            close(f"combined_topk_weights {tag}", kwts, rwts, seed)
    # Through the padded handle (padding rows ignored).
    padded = torch.cat([expert_out, torch.randn(worst - num_recv, HIDDEN).to(torch.bfloat16)])
    kx, _, _ = kernels.combine(gpu(padded), kw[4], config=config)
    rx, _, _ = reference.combine(padded, rw[4], config=config)
    close("combined_x (worst handle)", kx, rx, seed)
    # Deterministic: same inputs, same bits.
    kx2, _, _ = kernels.combine(gpu(padded), kw[4], config=config)
    assert torch.equal(kx.cpu(), kx2.cpu()), f"combine is not deterministic (seed {seed})"


def _check_capture_refused(rank, world, kernels, reference, device, seed):
    """Under CUDA-graph capture, dispatch and combine refuse before launching or advancing the call
    number (a replay would reuse it), and the Buffer works eagerly afterwards. Capture is modelled
    by the target's is_capturing, so this runs on the emulator too."""
    num_experts = 4 * world
    mine = make_inputs(seed + 99, rank, _tokens(rank, world, 7), HIDDEN, 2, num_experts)
    layout = dict(zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank"),
                      kernels.get_dispatch_layout(mine.topk_idx.to(device), num_experts)[:4]))
    eager = kernels._normal._target
    k = kernels.dispatch(mine.x.to(device), topk_idx=mine.topk_idx.to(device), config=CONFIGS[0], **layout)
    kernels._normal._target = dataclasses.replace(eager, is_capturing=lambda: True)
    try:
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
            kernels.dispatch(mine.x.to(device), topk_idx=mine.topk_idx.to(device), num_worst_tokens=64,
                             config=CONFIGS[0], **layout)
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
            kernels.combine(k[0], k[4], config=CONFIGS[0])
    finally:
        kernels._normal._target = eager
    r = reference.dispatch(mine.x, topk_idx=mine.topk_idx, config=CONFIGS[0],
                           **reference_layout(reference, mine.topk_idx, num_experts))
    exact("recv_x after refused captures", k[0], r[0], seed)
    kx, _, _ = kernels.combine(k[0], k[4], config=CONFIGS[0])
    rx, _, _ = reference.combine(r[0], r[4], config=CONFIGS[0])
    close("combined_x after refused captures", kx, rx, seed)


def reference_layout(reference, topk_idx, num_experts):
    got = reference.get_dispatch_layout(topk_idx, num_experts)
    return dict(zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert", "is_token_in_rank"),
                    got[:4]))


def _body(rank, world, group, ranks_per_node, seed, float_partials):
    os.environ["EP_COMM_RANKS_PER_NODE"] = str(ranks_per_node)
    if float_partials:
        os.environ["EP_COMM_INTERNODE_FLOAT_PARTIALS"] = "1"  # node partials as float32, not bf16
    os.environ["EP_COMM_TIMEOUT_S"] = DEVICE_TIMEOUT_S
    device = setup_device(rank)
    num_rdma_bytes = max(max(cfg.get_rdma_buffer_size_hint(HIDDEN * 2, world) for cfg in CONFIGS), 1)
    kernels = ep_comm.Buffer(group, num_nvl_bytes=0, num_rdma_bytes=num_rdma_bytes, backend=KERNELS)
    assert kernels._normal.name == "internode", kernels._normal.name
    assert kernels.get_num_rdma_ranks() == world // ranks_per_node
    reference = ep_comm.Buffer(group, backend="reference")
    for i, config in enumerate(CONFIGS):
        _check_config(rank, world, kernels, reference, config, seed + i, device)
    _check_capture_refused(rank, world, kernels, reference, device, seed)
    # A buffer too small for a call is refused on the host, before any launch, naming the size.
    big = Config(num_sms=8, num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256)
    mine = make_inputs(seed, rank, 4, HIDDEN, 2, 4 * world)
    layout = kernels.get_dispatch_layout(mine.topk_idx.to(device), 4 * world)[:4]
    with pytest.raises(RuntimeError, match="num_rdma_bytes >="):
        kernels.dispatch(mine.x.to(device), topk_idx=mine.topk_idx.to(device), config=big,
                         num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
                         num_tokens_per_expert=layout[2], is_token_in_rank=layout[3])
    # Every rank refused before notify, so the call numbers stayed together: the next call runs.
    _check_capture_refused(rank, world, kernels, reference, device, seed + 5)
    synchronize()
    kernels.check_errors()
    dist.barrier(group)
    # Collective (NVSHMEM frees), so only on success and on every rank: a rank that failed must not
    # block its peers in a collective free (its buffer goes with the bounded exit hook instead).
    kernels.destroy()
    reference.destroy()


@pytest.mark.parametrize("world,ranks_per_node,float_partials", [(4, 2, False), (8, 4, False), (8, 2, False),
                                                                  (4, 2, True)])
def test_internode_matches_reference(world, ranks_per_node, float_partials):
    run_ranks(_body, world, timeout_s=400.0, ranks_per_node=ranks_per_node, seed=SEED + world * 10 + ranks_per_node,
              float_partials=float_partials)


# ---- errors: a rank alone times out, a mismatch is reported by every rank --------------------------

def _failure_buffer(rank, world, group, ranks_per_node, timeout_s):
    """A small internode kernel Buffer whose device waits give up after `timeout_s`, with the host
    agreement off: these cases test the kernels' own checks."""
    os.environ["EP_COMM_RANKS_PER_NODE"] = str(ranks_per_node)
    os.environ["EP_COMM_TIMEOUT_S"] = str(timeout_s)
    os.environ["EP_COMM_AGREE"] = "0"
    num_rdma_bytes = CONFIGS[0].get_rdma_buffer_size_hint(HIDDEN * 2, world)
    return ep_comm.Buffer(group, num_nvl_bytes=0, num_rdma_bytes=num_rdma_bytes, backend=KERNELS)


def _layout(buffer, topk_idx, num_experts):
    got = buffer.get_dispatch_layout(topk_idx, num_experts)
    return dict(num_tokens_per_rank=got[0], num_tokens_per_rdma_rank=got[1], num_tokens_per_expert=got[2],
                is_token_in_rank=got[3])


def _timeout_body(rank, world, group, seed):
    """Rank 0 dispatches alone: its notify gives up after EP_COMM_TIMEOUT_S naming rank, phase and a
    peer, as EpCommTimeout; the error is sticky."""
    device = setup_device(rank)
    num_experts = 4 * world
    mine = make_inputs(seed, rank, 12, HIDDEN, 2, num_experts)
    x, idx = mine.x.to(device), mine.topk_idx.to(device)
    buffer = _failure_buffer(rank, world, group, 2, 3)
    layout = _layout(buffer, idx, num_experts)
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(RuntimeError) as info:
            buffer.dispatch(x, topk_idx=idx, config=CONFIGS[0], **layout)
        message = str(info.value)
        assert "rank 0" in message and "internode-notify" in message and "peer" in message, message
        assert isinstance(info.value, ep_comm.EpCommTimeout), type(info.value)
        assert time.monotonic() - start >= 2.5, "the notify gave up before EP_COMM_TIMEOUT_S"
        with pytest.raises(RuntimeError):  # sticky: the buffer is out of step with its peers
            buffer.dispatch(x, topk_idx=idx, config=CONFIGS[0], **layout)
    synchronize()
    dist.barrier(group)
    buffer.destroy()


def test_internode_timeout_names_rank_phase_and_peer():
    run_ranks(_timeout_body, 4, seed=SEED + 1, timeout_s=300)


def _mismatch_body(rank, world, group, seed):
    """Rank 0 combines with top-k weights, the others without: the combine rings would differ. Every
    rank's notify sees a peer's signature differ and reports it, well before the timeout."""
    device = setup_device(rank)
    num_experts = 4 * world
    mine = make_inputs(seed, rank, 12, HIDDEN, 2, num_experts)
    x, idx, w = mine.x.to(device), mine.topk_idx.to(device), mine.topk_weights.to(device)
    buffer = _failure_buffer(rank, world, group, 2, 60)
    try:
        layout = _layout(buffer, idx, num_experts)
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=w, config=CONFIGS[0],
                                                          **layout)
        synchronize()
        dist.barrier(group)
        start = time.monotonic()
        try:
            buffer.combine(recv_x, handle, topk_weights=recv_w if rank == 0 else None, config=CONFIGS[0])
        except RuntimeError:
            pass  # may be raised here already; check_errors raises it again (sticky)
        synchronize()
        with pytest.raises(RuntimeError) as info:
            buffer.check_errors()
        message = str(info.value)
        assert "invalid input" in message and "internode-notify" in message and "peer" in message, message
        assert time.monotonic() - start < 30, f"the mismatch took a timeout to surface: {message}"
        dist.barrier(group)
    finally:
        buffer.destroy()


def test_internode_mismatch_is_reported_by_every_rank():
    run_ranks(_mismatch_body, 4, seed=SEED + 2, timeout_s=300)
