"""Intranode (NVLink / CUDA IPC) kernels against the reference backend, R ranks on one GPU.

Every rank runs as its own process on cuda:(rank % device_count) over a gloo group (NCCL refuses
two ranks on one GPU; gloo only carries the control plane). Each rank builds a kernel Buffer and a
reference Buffer and feeds both the same seeded inputs (GPU tensors to the kernels, CPU copies to
the reference). Copies must match bit for bit; combine (a float reduction) within calc_diff 5e-6.

Without MPS the ranks' kernels time-slice the GPU, so sizes stay small. With MPS, keep
world * num_sms below the SM count: all blocks of all ranks must be resident together.

Without a GPU the same tests run the same kernels on the emulated device (common.py: KERNELS is
"emulated", tensors are on the CPU), CUDA graphs excepted.

Kernel-only cases: CUDA-graph capture of the no-host-sync path (num_worst_tokens dispatch,
combine, cached dispatch) replayed with new data; cross-rank mismatches and a num_worst_tokens
overflow reported on every rank at once (not after a device timeout), also when the ranks launch
one after another; a timeout naming its peer; a timeout inside a kernel stopping every peer at once.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

import ep_comm
from ep_comm import fp8
from ep_comm.config import Config
from ep_comm.testing import make_inputs
from common import (DEVICE_TIMEOUT_S, GPU_TEST, KERNELS, close, exact, needs_gpu, run_ranks, setup_device, split,
                    synchronize)

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
    assert kernels._normal.name == "intranode", kernels._normal.name
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
    os.environ["EP_COMM_AGREE"] = "0"  # rank 0 dispatches alone: the kernels' timeout is under test
    buffer = ep_comm.Buffer(group, num_nvl_bytes=nvl_bytes, backend=KERNELS)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    if rank == 0:
        with pytest.raises(RuntimeError) as info:
            buffer.dispatch(x, topk_idx=idx, config=config, **layout)
        message = str(info.value)
        assert "rank 0" in message and "barrier" in message and "peer" in message, message
        assert isinstance(info.value, ep_comm.EpCommTimeout), type(info.value)  # one type for every timeout
        with pytest.raises(RuntimeError):  # the error is sticky: the buffer is out of step with its peers
            buffer.dispatch(x, topk_idx=idx, config=config, **layout)
    # The raises above come from the host while this rank's notify kernels (the second one launched
    # on purpose, to tell peers "failed") may still run and write into the peers' buffers: finish
    # them before the barrier lets the peers free those buffers.
    synchronize()
    dist.barrier(group)
    buffer.destroy()

    os.environ["EP_COMM_TIMEOUT_S"] = DEVICE_TIMEOUT_S
    os.environ.pop("EP_COMM_AGREE")
    buffer = ep_comm.Buffer(group, num_nvl_bytes=nvl_bytes, backend=KERNELS)
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


def test_intranode_timeout_names_rank_phase_and_peer():
    run_ranks(_timeout_body, 2, seed=SEED, timeout_s=300)


# ---- CUDA graphs ------------------------------------------------------------------------------

def _graph_step(buffer, rank, x, idx, w, x2, num_experts, num_worst, config):
    """The no-host-sync path as a model would capture it: layout, num_worst_tokens dispatch, an
    "expert" (elementwise, on the device), combine with the received weights, cached dispatch."""
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    recv_x, recv_idx, recv_w, per_expert_list, handle, _ = buffer.dispatch(
        x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, num_worst_tokens=num_worst, config=config)
    y = (recv_x.float() * (0.5 + rank) + 0.25).bfloat16()
    combined_x, combined_w, _ = buffer.combine(y, handle, topk_weights=recv_w, config=config)
    cached_x = buffer.dispatch(x2, handle=handle, config=config)[0]
    # Everything made during a capture stays referenced (the handle's layout tensors and y are
    # what the replays read and write).
    return dict(recv_x=recv_x, recv_topk_idx=recv_idx, recv_topk_weights=recv_w, per_expert_list=per_expert_list,
                combined_x=combined_x, combined_topk_weights=combined_w, cached_x=cached_x, handle=handle, y=y,
                layout=(per_rank, per_expert, in_rank))


def _check_graph_step(tag, got, reference, rank, x, idx, w, x2, num_experts, num_worst, seed):
    """Same step on the reference backend (CPU copies), compared with `got`."""
    want = _graph_step(reference, rank, x, idx, w, x2, num_experts, num_worst, None)
    for name in ("recv_x", "recv_topk_idx", "recv_topk_weights", "cached_x"):
        exact(f"{tag} {name}", got[name], want[name], seed)
    assert list(got["per_expert_list"]) == [] == list(want["per_expert_list"]), tag
    close(f"{tag} combined_x", got["combined_x"], want["combined_x"], seed)
    close(f"{tag} combined_topk_weights", got["combined_topk_weights"], want["combined_topk_weights"], seed)


def _graph_body(rank, world, group, seed):
    os.environ["EP_COMM_TIMEOUT_S"] = DEVICE_TIMEOUT_S
    device = setup_device(rank)
    config = CONFIGS[0]
    kernels = ep_comm.Buffer(group, num_nvl_bytes=config.get_nvl_buffer_size_hint(HIDDEN * 2, world), backend=KERNELS)
    reference = ep_comm.Buffer(group, backend="reference")
    num_experts = 4 * world
    num_topk = min(6, num_experts)
    num_tokens = _tokens(rank, world, 40)  # static shapes: the same token count at every replay
    num_worst = sum(_tokens(r, world, 40) for r in range(world))  # a rank can never receive more

    def inputs(it):
        case = make_inputs(seed + it, rank, num_tokens, HIDDEN, num_topk, num_experts, masked_fraction=0.2)
        return case.x, case.topk_idx, case.topk_weights, (case.x.float() * -1.5 + 0.5).bfloat16()

    first = inputs(0)
    static = [t.to(device) for t in first]  # x, topk_idx, topk_weights, x2: captured by address

    try:
        # Warm up (and check) eagerly on a side stream, as torch asks before capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            eager = _graph_step(kernels, rank, *static, num_experts, num_worst, config)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        kernels.check_errors()
        _check_graph_step(f"rank {rank} eager", eager, reference, rank, *first, num_experts, num_worst, seed)
        dist.barrier(group)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # captures on torch's side stream; Buffer forks its comm stream
            captured = _graph_step(kernels, rank, *static, num_experts, num_worst, config)
        torch.cuda.synchronize()
        dist.barrier(group)

        for it in range(1, 5):
            data = inputs(it)
            for dst, src in zip(static, data):
                dst.copy_(src)
            if it == 3:
                # An eager step between replays: the epoch lives on the device, so replays go on
                # from wherever eager calls left it (on every rank alike).
                _graph_step(kernels, rank, *static, num_experts, num_worst, config)
            graph.replay()
            torch.cuda.synchronize()
            kernels.check_errors()
            _check_graph_step(f"rank {rank} replay {it}", captured, reference, rank, *data, num_experts, num_worst,
                              seed)
        del graph, captured
        torch.cuda.synchronize()
        dist.barrier(group)
    finally:
        kernels.destroy()
        reference.destroy()


@needs_gpu
@pytest.mark.parametrize("world", [2, 4])
def test_intranode_cuda_graph_replays_match_reference(world):
    run_ranks(_graph_body, world, seed=SEED + 31 * world, timeout_s=600)


# ---- cross-rank errors reported everywhere, without a timeout ------------------------------------

_FAST_S = 15.0  # the device timeout in these tests is 60 s: an error seen sooner was not a timeout


def _raise_pending(buffer):
    synchronize()
    with pytest.raises(RuntimeError) as info:
        buffer.check_errors()
    return str(info.value)


def _failure_case(rank, world, group, seed):
    """The small case the failure tests share: 24 tokens per rank, a short device timeout, a kernel
    Buffer. Returns (x, topk_idx, topk_weights, num_experts, config, buffer)."""
    os.environ["EP_COMM_TIMEOUT_S"] = DEVICE_TIMEOUT_S
    os.environ["EP_COMM_AGREE"] = "0"  # these cases test the kernels' own checks, not the host agreement
    device = setup_device(rank)
    config = CONFIGS[0]
    num_experts = 4 * world
    inputs = make_inputs(seed, rank, 24, HIDDEN, 4, num_experts)
    x, idx, w = inputs.x.to(device), inputs.topk_idx.to(device), inputs.topk_weights.to(device)
    buffer = ep_comm.Buffer(group, num_nvl_bytes=config.get_nvl_buffer_size_hint(HIDDEN * 2, world), backend=KERNELS)
    return x, idx, w, num_experts, config, buffer


def _mismatch_body(rank, world, group, seed):
    """Rank 0 combines with topk_weights, the others without: the combine rings disagree. Every
    rank must report the mismatch at combine's start rendezvous, naming a peer."""
    x, idx, w, num_experts, config, buffer = _failure_case(rank, world, group, seed)
    try:
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank,
                                                          is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                          config=config)
        synchronize()
        dist.barrier(group)
        start = time.monotonic()
        try:
            buffer.combine(recv_x, handle, topk_weights=recv_w if rank == 0 else None, config=config)
        except RuntimeError:
            pass  # the error may already be raised here; check_errors below raises it again (sticky)
        message = _raise_pending(buffer)
        elapsed = time.monotonic() - start
        assert "launched different intranode calls" in message and "rank" in message, message
        assert elapsed < _FAST_S, f"mismatch took {elapsed:.1f} s to surface: {message}"
        dist.barrier(group)
    finally:
        buffer.destroy()


@pytest.mark.parametrize("world", [2, 3])
def test_intranode_mismatch_is_reported_by_every_rank(world):
    run_ranks(_mismatch_body, world, seed=SEED + 7, timeout_s=300)


def _overflow_body(rank, world, group, seed):
    """Rank 0 passes num_worst_tokens=1 and receives more rows: it reports that in notify, and its
    dispatch tells every peer at the start rendezvous, so all ranks fail fast (no timeout)."""
    x, idx, w, num_experts, config, buffer = _failure_case(rank, world, group, seed)
    try:
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
        synchronize()
        dist.barrier(group)
        start = time.monotonic()
        try:
            recv_x, _, _, _, handle, _ = buffer.dispatch(
                x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, num_worst_tokens=1 if rank == 0 else world * 24, config=config)
            buffer.combine(recv_x, handle, config=config)
        except RuntimeError:
            pass  # raised after launching dispatch or combine; check_errors below raises it again
        message = _raise_pending(buffer)
        elapsed = time.monotonic() - start
        if rank == 0:
            assert "more than num_worst_tokens" in message, message
        else:
            assert "because rank 0 had already failed" in message, message
        assert elapsed < _FAST_S, f"the overflow took {elapsed:.1f} s to surface: {message}"
        dist.barrier(group)
    finally:
        buffer.destroy()


def test_intranode_worst_tokens_overflow_fails_every_rank_fast():
    run_ranks(_overflow_body, 3, seed=SEED + 11, timeout_s=300)


# ---- a failure inside a running kernel stops every peer at once ------------------------------------

_LONG_TIMEOUT_S = "30"   # the peers' device timeout: they must end long before it
_SHORT_TIMEOUT_S = "2"   # the failing rank's


def _expert_of(rank: int) -> int:
    """The first of rank `rank`'s local experts (4 per rank in these tests)."""
    return 4 * rank


def _routed_inputs(rank, world, seed, routes, device):
    """24 tokens of this rank, each sent to the ranks in routes[rank] (top-`world`: one expert per
    listed rank, the rest -1). Returns (x, topk_idx, topk_weights)."""
    inputs = make_inputs(seed, rank, 24, HIDDEN, world, 4 * world)
    dests = list(routes[rank]) + [-1] * (world - len(routes[rank]))
    idx = torch.tensor([[_expert_of(d) if d >= 0 else -1 for d in dests]] * 24, dtype=torch.int64)
    return inputs.x.to(device), idx.to(device), inputs.topk_weights.to(device)


def _abort_body(rank, world, group, seed, where):
    """Rank 0 fails inside a kernel (a short device timeout); every other rank, with a long one,
    must stop within seconds with an error naming rank 0 and the phase it failed in, instead of
    waiting out its own timeout.

    where="notify": the peers start their dispatch only after rank 0 timed out in the rendezvous
    of its notify kernel; their notify then waits for counts rank 0 never sends.
    where="combine": both run combine with handles of two different dispatches (the signatures
    agree, the routing does not), so each waits in combine-recv for rows the other never sends.
    """
    os.environ["EP_COMM_TIMEOUT_S"] = _SHORT_TIMEOUT_S if rank == 0 else _LONG_TIMEOUT_S
    os.environ["EP_COMM_AGREE"] = "0"  # the kernels' own abort path, not the host agreement, is under test
    device = setup_device(rank)
    config = CONFIGS[0]
    buffer = ep_comm.Buffer(group, num_nvl_bytes=config.get_nvl_buffer_size_hint(HIDDEN * 2, world), backend=KERNELS)
    num_experts = 4 * world
    try:
        if where == "notify":
            x, idx, w = _routed_inputs(rank, world, seed, [[0, 1]] * world, device)
            layout = buffer.get_dispatch_layout(idx, num_experts)
            kw = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
            synchronize()
            dist.barrier(group)
            if rank != 0:
                time.sleep(float(_SHORT_TIMEOUT_S) + 2)  # rank 0 has given up by now
            start = time.monotonic()
            with pytest.raises(RuntimeError) as info:
                buffer.dispatch(x, topk_idx=idx, topk_weights=w, config=config, **kw)
        else:
            # Dispatch A: rank 0's tokens stay home, the others' go everywhere; B the other way round.
            handles = []
            for routes in ([[0]] + [list(range(world))] * (world - 1), [list(range(world))] + [[r] for r in range(1, world)]):
                x, idx, w = _routed_inputs(rank, world, seed, routes, device)
                layout = buffer.get_dispatch_layout(idx, num_experts)
                synchronize()
                dist.barrier(group)  # in step: rank 0's short timeout must not fire here
                recv_x, _, _, _, handle, _ = buffer.dispatch(
                    x, topk_idx=idx, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                    num_tokens_per_expert=layout[2], config=config)
                handles.append((recv_x, handle))
            synchronize()
            dist.barrier(group)
            # Rank 0 expects its rows back from every peer (B), which return none (A), and vice versa.
            recv_x, handle = handles[1] if rank == 0 else handles[0]
            start = time.monotonic()
            try:
                buffer.combine(recv_x, handle, config=config)
            except RuntimeError:
                pass  # on the emulator the op synchronizes, so the error may come here already
            with pytest.raises(RuntimeError) as info:
                synchronize()
                buffer.check_errors()
        elapsed = time.monotonic() - start
        message = str(info.value)
        if rank == 0:
            assert "rank 0 timed out" in message, message
        else:
            # Rank 0 gives up wherever it waits first: in combine-recv for the peers' rows, or in
            # combine-send for ring space its own stalled receiver never frees.
            phase = "barrier" if where == "notify" else "combine-"
            assert f"because rank 0 failed in phase {phase}" in message, message
            assert elapsed < float(_LONG_TIMEOUT_S) / 3, f"rank {rank} took {elapsed:.1f} s to stop: {message}"
        synchronize()
        dist.barrier(group)
    finally:
        buffer.destroy()


@pytest.mark.parametrize("where", ["notify", "combine"])
def test_intranode_failure_inside_a_kernel_stops_every_peer_fast(where):
    run_ranks(_abort_body, 2 if where == "notify" else 3, seed=SEED + 13, timeout_s=300, where=where)


def _staggered_mismatch_body(rank, world, group, seed):
    """The mismatch of _mismatch_body with the ranks launching combine one after another (rank 1,
    then 0, then 2): rank 0 meets rank 1's signature at once, in its first blocks, while its later
    blocks are still starting; rank 2 arrives when all of rank 0's blocks have published. Every
    rank must still report the mismatch itself, not "rank 0 had already failed". Repeated under
    the emulator's thread schedules (no effect on a GPU), each time on a fresh Buffer."""
    for schedule in ("forward", "reverse", "random:11"):
        os.environ["EP_COMM_EMU_SCHEDULE"] = schedule
        x, idx, w, num_experts, config, buffer = _failure_case(rank, world, group, seed)
        try:
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
            recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
                x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, config=config)
            synchronize()
            dist.barrier(group)
            time.sleep({1: 0.0, 0: 0.3, 2: 0.6}.get(rank, 0.6))
            try:
                buffer.combine(recv_x, handle, topk_weights=recv_w if rank == 0 else None, config=config)
            except RuntimeError:
                pass
            message = _raise_pending(buffer)
            assert "launched different intranode calls" in message, f"schedule {schedule}: {message}"
            dist.barrier(group)
        finally:
            buffer.destroy()
    os.environ.pop("EP_COMM_EMU_SCHEDULE", None)


def test_intranode_mismatch_is_reported_by_every_rank_when_launches_are_staggered():
    run_ranks(_staggered_mismatch_body, 3, seed=SEED + 17, timeout_s=300)
