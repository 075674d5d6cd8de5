"""Intranode (NVLink / CUDA IPC) kernels against the reference backend, R ranks on one GPU.

Every rank runs as its own process on cuda:(rank % device_count) over a gloo group (NCCL refuses
two ranks on one GPU; gloo only carries the control plane). Each rank builds a kernel Buffer and a
reference Buffer and feeds both the same seeded inputs (GPU tensors to the kernels, CPU copies to
the reference). Copies must match bit for bit; combine (a float reduction) within calc_diff 5e-6.

Without MPS the ranks' kernels time-slice the GPU, so sizes stay small. With MPS, keep
world * num_sms below the SM count: all blocks of all ranks must be resident together.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import ep_comm
from ep_comm import fp8
from ep_comm.config import Config
from ep_comm.testing import make_inputs
from common import (DEVICE_TIMEOUT_S, DRY_RUN, GPU_TEST, KERNELS, close, exact, kernel_only, run_ranks, setup_device,
                    split, synchronize)

pytestmark = GPU_TEST

HIDDEN = 256
SEED = 20261124
# Tiny rings (8 slots, rounds of 4) make every ring wrap many times; the second config is roomier
# and uses a different channel count, so the token split changes between calls on one buffer.
CONFIGS = [
    Config(num_sms=4, num_max_nvl_chunked_send_tokens=2, num_max_nvl_chunked_recv_tokens=8),
    Config(num_sms=6, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=64),
]


def _tokens(rank: int, world: int, base: int) -> int:
    """Uneven token counts; the last rank has none."""
    return 0 if rank == world - 1 else base + 5 * rank


def _check_call_sequence(rank, world, kernels, reference, config, seed, device):
    num_experts = 4 * world
    num_topk = min(6, num_experts)
    inputs = make_inputs(seed, rank, _tokens(rank, world, 40), HIDDEN, num_topk, num_experts, masked_fraction=0.2)
    x_cpu, idx_cpu, w_cpu = inputs.x, inputs.topk_idx, inputs.topk_weights
    x, idx, w = x_cpu.to(device), idx_cpu.to(device), w_cpu.to(device)

    # ---- layout ----
    k_layout = kernels.get_dispatch_layout(idx, num_experts)
    r_layout = reference.get_dispatch_layout(idx_cpu, num_experts)
    for name, a, b in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                           "is_token_in_rank"), k_layout[:4], r_layout[:4]):
        exact(f"layout {name}", a, b, seed)
    k_kw = dict(num_tokens_per_rank=k_layout[0], is_token_in_rank=k_layout[3], num_tokens_per_expert=k_layout[2])
    r_kw = dict(num_tokens_per_rank=r_layout[0], is_token_in_rank=r_layout[3], num_tokens_per_expert=r_layout[2])

    bias0_cpu = (torch.randn(x_cpu.shape, generator=torch.Generator().manual_seed(seed + 7)) * 0.1).bfloat16()
    bias1_cpu = (torch.randn(x_cpu.shape, generator=torch.Generator().manual_seed(seed + 8)) * 0.1).bfloat16()
    bias0, bias1 = bias0_cpu.to(device), bias1_cpu.to(device)

    for num_worst in (0, sum(_tokens(r, world, 40) for r in range(world)) + 3):
        for alignment in (1, 4):
            for use_fp8 in (False, True):
                with_weights = not (use_fp8 and alignment == 4)  # also cover dispatch without weights
                tag = f"worst={num_worst} align={alignment} fp8={use_fp8} weights={with_weights}"
                r_x = fp8.per_token_cast_to_fp8(x_cpu) if use_fp8 else x_cpu
                k_x = (r_x[0].to(device), r_x[1].to(device)) if use_fp8 else x
                k_out = kernels.dispatch(k_x, topk_idx=idx, topk_weights=w if with_weights else None,
                                         expert_alignment=alignment, num_worst_tokens=num_worst, config=config, **k_kw)
                r_out = reference.dispatch(r_x, topk_idx=idx_cpu, topk_weights=w_cpu if with_weights else None,
                                           expert_alignment=alignment, num_worst_tokens=num_worst, **r_kw)
                k_recv, k_scales = split(k_out[0])
                r_recv, r_scales = split(r_out[0])
                exact(f"{tag} recv_x", k_recv, r_recv, seed)
                exact(f"{tag} recv_x scales", k_scales, r_scales, seed)
                exact(f"{tag} recv_topk_idx", k_out[1], r_out[1], seed)
                exact(f"{tag} recv_topk_weights", k_out[2], r_out[2], seed)
                exact(f"{tag} num_recv_tokens_per_expert_list", k_out[3], r_out[3], seed)
                k_handle, r_handle = k_out[4], r_out[4]
                assert k_handle.num_recv_rows == r_handle.num_recv_rows, tag

                # Cached dispatch: new payload, same layout (combine's backward).
                x2_cpu = (x_cpu.float() * 2 - 1).bfloat16()
                r_x2 = fp8.per_token_cast_to_fp8(x2_cpu) if use_fp8 else x2_cpu
                k_x2 = (r_x2[0].to(device), r_x2[1].to(device)) if use_fp8 else r_x2.to(device)
                k_cached = kernels.dispatch(k_x2, handle=k_handle, config=config)
                r_cached = reference.dispatch(r_x2, handle=r_handle)
                assert k_cached[1:5] == (None, None, None, None), tag
                k_recv2, k_scales2 = split(k_cached[0])
                r_recv2, r_scales2 = split(r_cached[0])
                exact(f"{tag} cached recv_x", k_recv2, r_recv2, seed)
                exact(f"{tag} cached recv_x scales", k_scales2, r_scales2, seed)

                if use_fp8:
                    continue
                # Combine: an "expert output" derived from the (identical) received rows.
                y_cpu = (r_recv.float() * (0.5 + rank) + 0.25).bfloat16()
                y = y_cpu.to(device)
                for bias_k, bias_r in ((None, None), (bias0, bias0_cpu), ((bias0, bias1), (bias0_cpu, bias1_cpu))):
                    for use_w in (False, True) if with_weights else (False,):
                        ctag = f"{tag} combine bias={0 if bias_k is None else (1 if not isinstance(bias_k, tuple) else 2)} w={use_w}"
                        k_comb = kernels.combine(y, k_handle, topk_weights=k_out[2] if use_w else None, bias=bias_k,
                                                 config=config)
                        r_comb = reference.combine(y_cpu, r_handle, topk_weights=r_out[2] if use_w else None,
                                                   bias=bias_r)
                        close(f"{ctag} combined_x", k_comb[0], r_comb[0], seed)
                        close(f"{ctag} combined_topk_weights", k_comb[1], r_comb[1], seed)
                        if not torch.equal(k_comb[0].cpu(), r_comb[0]):
                            print(f"rank {rank}: {ctag}: combine within tolerance but not bit-exact (seed {seed})")


def _body(rank, world, group, seed):
    os.environ["EP_COMM_TIMEOUT_S"] = DEVICE_TIMEOUT_S
    device = setup_device(rank)
    nvl_bytes = max(c.get_nvl_buffer_size_hint(HIDDEN * 2, world) for c in CONFIGS)
    kernels = ep_comm.Buffer(group, num_nvl_bytes=nvl_bytes, backend=KERNELS)
    reference = ep_comm.Buffer(group, backend="reference")
    assert DRY_RUN or kernels._normal.name == "intranode", kernels._normal.name
    try:
        # Several calls on one buffer: the buffer must be reusable without any clean-up.
        for i, config in enumerate(CONFIGS + CONFIGS[:1]):
            _check_call_sequence(rank, world, kernels, reference, config, seed + 101 * i, device)
        synchronize()
        kernels.check_errors()
        dist.barrier(group)  # nobody frees its buffer while a peer may still write into it
    finally:
        kernels.destroy()
        reference.destroy()


@pytest.mark.parametrize("world", [2, 4, 8])
def test_intranode_matches_reference(world):
    run_ranks(_body, world, seed=SEED + world, timeout_s=600)


def _timeout_body(rank, world, group, seed):
    """Only rank 0 dispatches: it must raise a RuntimeError naming rank, phase and peer, stay
    unusable, and after every rank destroyed its Buffer, fresh Buffers must work again."""
    device = setup_device(rank)
    config = CONFIGS[0]
    nvl_bytes = config.get_nvl_buffer_size_hint(HIDDEN * 2, world)
    num_experts = 4 * world
    inputs = make_inputs(seed, rank, 24, HIDDEN, 4, num_experts)
    x, idx = inputs.x.to(device), inputs.topk_idx.to(device)

    os.environ["EP_COMM_TIMEOUT_S"] = "3"
    buffer = ep_comm.Buffer(group, num_nvl_bytes=nvl_bytes, backend="kernels")
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    if rank == 0:
        with pytest.raises(RuntimeError) as info:
            buffer.dispatch(x, topk_idx=idx, config=config, **layout)
        message = str(info.value)
        assert "rank 0" in message and "barrier" in message and "peer" in message, message
        with pytest.raises(RuntimeError):  # the error is sticky: the buffer is out of step with its peers
            buffer.dispatch(x, topk_idx=idx, config=config, **layout)
    dist.barrier(group)
    buffer.destroy()

    os.environ["EP_COMM_TIMEOUT_S"] = DEVICE_TIMEOUT_S
    buffer = ep_comm.Buffer(group, num_nvl_bytes=nvl_bytes, backend="kernels")
    try:
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, config=config, **layout)
        combined, _, _ = buffer.combine(recv_x, handle, config=config)
        # Every copy of a token comes back unchanged, so the sum is x times its number of ranks.
        expected = (x.float() * in_rank.sum(1, keepdim=True).float()).bfloat16()
        exact("combine after recovery", combined, expected, seed)
        synchronize()
        dist.barrier(group)
    finally:
        buffer.destroy()


@kernel_only
def test_intranode_timeout_names_rank_phase_and_peer():
    run_ranks(_timeout_body, 2, seed=SEED, timeout_s=300)
