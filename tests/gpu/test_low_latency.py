"""Low-latency kernels (NVSHMEM) against the reference backend, R ranks as R processes on one GPU.

Every case feeds the kernel Buffer and a reference Buffer the same fresh seeded inputs (the
reference runs on CPU copies over the same gloo group) and compares:
  * dispatch: recv_count exactly; the valid rows of recv_x bit for bit (bf16 and FP8 bytes), FP8
    scales exactly (float32 and packed UE8M0);
  * combine: calc_diff < 1e-5 (both sides multiply then add in float32 in slot order, so the
    result is expected to be bit-exact; a mismatch is printed).
Cases: bf16 / FP8 / round_scale / UE8M0, receive hooks (two ops in flight), zero-copy and out=,
back-to-back calls, cumulative stats, CUDA-graph capture and replay with new data (including
graphs with an odd number of ops, replayed at a shifted parity), re-layout after
clean_low_latency_buffer, a too-small buffer, and a device timeout that becomes a Python error.

Ranks share one GPU (NVSHMEM "MPG"); without the MPS daemon their kernels time-slice, so sizes
are small. Run: pytest -m gpu tests/gpu/test_low_latency.py
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import ep_comm
from ep_comm import fp8, validation
from ep_comm.testing import calc_diff, make_inputs
from common import EMULATED, GPU_TEST, KERNELS, run_ranks, setup_device, synchronize

pytestmark = GPU_TEST

SEED = 20261124
TOKENS = 16          # num_max_dispatch_tokens_per_rank
HIDDEN = 512         # a multiple of 512, so UE8M0 works
TOKENS_2, HIDDEN_2 = 8, 264   # second layout (bf16 only: 264 is not a multiple of 128)
TIMEOUT_S = "30"
_DEVICE = torch.device("cpu")   # this rank's device, set by _body (each rank is its own process)


def _num_tokens(rank: int, world: int, limit: int) -> int:
    """Uneven token counts; the last rank of a world of 3+ has none."""
    if world >= 3 and rank == world - 1:
        return 0
    return max(1, limit - 2 * rank)


def _inputs(seed: int, rank: int, world: int, limit: int, hidden: int, num_topk: int, num_experts: int):
    return make_inputs(seed, rank, _num_tokens(rank, world, limit), hidden, num_topk, num_experts,
                       masked_fraction=0.15)


def _expert_outputs(seed: int, rank: int, experts_per_rank: int, rows: int, hidden: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    return torch.randn(experts_per_rank, rows, hidden, generator=g).to(torch.bfloat16)


class _Case:
    """One rank's inputs as CPU (reference) and GPU (kernel) tensors."""

    def __init__(self, seed, rank, world, limit, hidden, num_topk, num_experts):
        self.seed = seed
        self.cpu = _inputs(seed, rank, world, limit, hidden, num_topk, num_experts)
        self.x = self.cpu.x.to(_DEVICE)
        self.topk_idx = self.cpu.topk_idx.to(_DEVICE)
        self.topk_weights = self.cpu.topk_weights.to(_DEVICE)


def _check_dispatch(tag, got_x, got_count, want_x, want_count, use_fp8):
    counts = want_count.tolist()
    assert got_count.cpu().tolist() == counts, f"{tag}: recv_count {got_count.cpu().tolist()} != {counts}"
    if not use_fp8:
        for e, c in enumerate(counts):
            assert torch.equal(got_x[e, :c].cpu(), want_x[e, :c]), f"{tag}: recv_x of expert {e} differs"
        return
    got_payload, got_scales = got_x
    want_payload, want_scales = want_x
    for e, c in enumerate(counts):
        assert torch.equal(got_scales[e, :c].cpu(), want_scales[e, :c]), f"{tag}: scales of expert {e} differ"
        g = got_payload[e, :c].cpu()
        w = want_payload[e, :c]
        if not torch.equal(g.view(torch.uint8), w.view(torch.uint8)):
            bad = int((g.view(torch.uint8) != w.view(torch.uint8)).sum())
            diff = calc_diff(fp8.per_token_cast_back(g, want_scales[e, :c].contiguous()),
                             fp8.per_token_cast_back(w, want_scales[e, :c].contiguous()))
            print(f"{tag}: {bad} FP8 bytes of expert {e} differ from the reference (dequantized diff {diff:.3g})")
            assert diff < 1e-4, f"{tag}: FP8 payload of expert {e} differs beyond dequantization tolerance"


def _check_combine(tag, got, want):
    got = got.cpu()
    assert got.shape == want.shape, f"{tag}: combined shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = calc_diff(got.float(), want.float())
    if not torch.equal(got, want):
        print(f"{tag}: combine is not bit-exact vs the reference (calc_diff {diff:.3g})")
    assert diff < 1e-5, f"{tag}: combine calc_diff {diff}"


def _reference_round(ref, case, num_max_tokens, num_experts, y, **kw):
    """Reference dispatch (CPU) and the combine of y; returns (recv_x, recv_count, combined)."""
    recv_x, recv_count, handle, _, _ = ref.low_latency_dispatch(case.cpu.x, case.cpu.topk_idx, num_max_tokens,
                                                               num_experts, **kw)
    combined, _, _ = ref.low_latency_combine(y, case.cpu.topk_idx, case.cpu.topk_weights, handle)
    return recv_x, recv_count, combined


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

MODES = [
    dict(use_fp8=False),
    dict(use_fp8=True),
    dict(use_fp8=True, round_scale=True),
    dict(use_fp8=True, round_scale=True, use_ue8m0=True),
]


def _check_modes_and_options(rank, world, buf, ref, num_experts, num_topk, seed):
    rows = world * TOKENS
    experts_per_rank = num_experts // world
    stats = torch.zeros(experts_per_rank, dtype=torch.int32, device=_DEVICE)
    expected_stats = torch.zeros(experts_per_rank, dtype=torch.int32)
    for i, mode in enumerate(MODES):
        case = _Case(seed + i, rank, world, TOKENS, HIDDEN, num_topk, num_experts)
        y = _expert_outputs(seed + i, rank, experts_per_rank, rows, HIDDEN)
        want_x, want_count, want_out = _reference_round(ref, case, TOKENS, num_experts, y, **mode)
        expected_stats += want_count
        tag = f"rank {rank} mode {mode}"

        recv_x, recv_count, handle, event, hook = buf.low_latency_dispatch(
            case.x, case.topk_idx, TOKENS, num_experts, cumulative_local_expert_recv_stats=stats, **mode)
        assert hook is None
        _check_dispatch(tag, recv_x, recv_count, want_x, want_count, mode["use_fp8"])
        if mode["use_fp8"]:
            scales = recv_x[1]
            assert scales.stride(1) == 1, f"{tag}: scales are not the column-major view"
            assert scales.dtype == (torch.int32 if mode.get("use_ue8m0") else torch.float32)

        # plain, out=, and zero-copy combines of the same expert outputs
        out, _, chook = buf.low_latency_combine(y.to(_DEVICE), case.topk_idx, case.topk_weights, handle)
        assert chook is None
        _check_combine(tag + " combine", out, want_out)
        target = torch.full((case.x.shape[0], HIDDEN), 7.0, dtype=torch.bfloat16, device=_DEVICE)
        out2, _, _ = buf.low_latency_combine(y.to(_DEVICE), case.topk_idx, case.topk_weights, handle, out=target)
        assert out2.data_ptr() == target.data_ptr()
        _check_combine(tag + " combine out=", target, want_out)
        zero_copy = buf.get_next_low_latency_combine_buffer(handle)
        assert zero_copy.shape == (experts_per_rank, rows, HIDDEN) and zero_copy.dtype == torch.bfloat16
        zero_copy.copy_(y.to(_DEVICE))
        out3, _, _ = buf.low_latency_combine(zero_copy, case.topk_idx, case.topk_weights, handle, zero_copy=True)
        _check_combine(tag + " combine zero_copy", out3, want_out)

        # async_finish: the event orders the compute stream after the call
        recv_x, recv_count, handle, event, _ = buf.low_latency_dispatch(case.x, case.topk_idx, TOKENS, num_experts,
                                                                       async_finish=True, **mode)
        event.current_stream_wait()
        _check_dispatch(tag + " async", recv_x, recv_count, want_x, want_count, mode["use_fp8"])
        out, event, _ = buf.low_latency_combine(y.to(_DEVICE), case.topk_idx, case.topk_weights, handle,
                                                async_finish=True)
        event.current_stream_wait()
        _check_combine(tag + " async combine", out, want_out)
    synchronize()
    assert torch.equal(stats.cpu(), expected_stats), f"rank {rank}: cumulative stats {stats.cpu()} != {expected_stats}"


def _check_hooks(rank, world, buf, ref, num_experts, num_topk, seed):
    """Two micro-batches in flight: send A, send B, receive A, receive B, then the same for combine."""
    rows = world * TOKENS
    experts_per_rank = num_experts // world
    cases = [_Case(seed + 50 + j, rank, world, TOKENS, HIDDEN, num_topk, num_experts) for j in range(2)]
    ys = [_expert_outputs(seed + 50 + j, rank, experts_per_rank, rows, HIDDEN) for j in range(2)]
    wants = [_reference_round(ref, c, TOKENS, num_experts, y, use_fp8=True) for c, y in zip(cases, ys)]

    sent = [buf.low_latency_dispatch(c.x, c.topk_idx, TOKENS, num_experts, use_fp8=True, return_recv_hook=True)
            for c in cases]
    # A third op would reuse the first op's half, whose receive never ran here: refused on the
    # host (on every rank alike, nothing is launched) instead of timing out on the device.
    with pytest.raises(RuntimeError, match="has not been called"):
        buf.low_latency_dispatch(cases[0].x, cases[0].topk_idx, TOKENS, num_experts, use_fp8=True)
    for recv_x, recv_count, handle, event, hook in sent:
        assert hook is not None and event.event is None
        hook()
    for j, (recv_x, recv_count, handle, _, _) in enumerate(sent):
        _check_dispatch(f"rank {rank} hook dispatch {j}", recv_x, recv_count, wants[j][0], wants[j][1], True)
    combined = [buf.low_latency_combine(y.to(_DEVICE), c.topk_idx, c.topk_weights, s[2], return_recv_hook=True)
                for c, y, s in zip(cases, ys, sent)]
    for out, _, hook in combined:
        hook()
    for j, (out, _, _) in enumerate(combined):
        _check_combine(f"rank {rank} hook combine {j}", out, wants[j][2])
    with pytest.raises(RuntimeError, match="only once"):
        combined[0][2]()


def _check_back_to_back(rank, world, buf, ref, num_experts, num_topk, seed):
    """Many ops without synchronising, including odd runs (two dispatches in a row)."""
    rows = world * TOKENS
    experts_per_rank = num_experts // world
    pending = []
    for it in range(6):
        case = _Case(seed + 100 + it, rank, world, TOKENS, HIDDEN, num_topk, num_experts)
        y = _expert_outputs(seed + 100 + it, rank, experts_per_rank, rows, HIDDEN)
        want = _reference_round(ref, case, TOKENS, num_experts, y, use_fp8=False)
        recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(case.x, case.topk_idx, TOKENS, num_experts,
                                                                   use_fp8=False)
        if it % 3 == 1:  # an extra dispatch nobody combines: shifts the parity by one
            buf.low_latency_dispatch(case.x, case.topk_idx, TOKENS, num_experts, use_fp8=False)
        out, _, _ = buf.low_latency_combine(y.to(_DEVICE), case.topk_idx, case.topk_weights, handle)
        pending.append((it, recv_x, recv_count, out, want))
    synchronize()
    for it, recv_x, recv_count, out, want in pending:
        _check_dispatch(f"rank {rank} back-to-back {it}", recv_x, recv_count, want[0], want[1], False)
        _check_combine(f"rank {rank} back-to-back combine {it}", out, want[2])


def _check_graphs(rank, world, buf, ref, num_experts, num_topk, seed, use_hook):
    rows = world * TOKENS
    experts_per_rank = num_experts // world
    first = _Case(seed + 200, rank, world, TOKENS, HIDDEN, num_topk, num_experts)
    num_tokens = first.x.shape[0]
    static_x, static_idx, static_w = first.x.clone(), first.topk_idx.clone(), first.topk_weights.clone()
    static_y = torch.zeros(experts_per_rank, rows, HIDDEN, dtype=torch.bfloat16, device=_DEVICE)
    mode = dict(use_fp8=True, round_scale=True)

    def dispatch():
        recv_x, recv_count, handle, _, hook = buf.low_latency_dispatch(static_x, static_idx, TOKENS, num_experts,
                                                                      return_recv_hook=use_hook, **mode)
        if hook is not None:
            hook()
        return recv_x, recv_count, handle

    def combine(handle):
        out, _, hook = buf.low_latency_combine(static_y, static_idx, static_w, handle, return_recv_hook=use_hook)
        if hook is not None:
            hook()
        return out

    # Warm up on a side stream, as torch asks before capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        combine(dispatch()[2])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()

    # One graph with both ops, and two one-op graphs (odd op counts).
    both = torch.cuda.CUDAGraph()
    with torch.cuda.graph(both):
        g_recv_x, g_recv_count, g_handle = dispatch()
        g_out = combine(g_handle)
    only_dispatch, only_combine = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(only_dispatch):
        d_recv_x, d_recv_count, d_handle = dispatch()
    with torch.cuda.graph(only_combine):
        d_out = combine(d_handle)
    torch.cuda.synchronize()
    dist.barrier()

    def load(it):
        # Same token count as at capture (it depends on rank and world only), new values.
        case = _Case(seed + 300 + it, rank, world, TOKENS, HIDDEN, num_topk, num_experts)
        assert case.x.shape[0] == num_tokens
        y = _expert_outputs(seed + 300 + it, rank, experts_per_rank, rows, HIDDEN)
        want = _reference_round(ref, case, TOKENS, num_experts, y, **mode)
        static_x.copy_(case.x)
        static_idx.copy_(case.topk_idx)
        static_w.copy_(case.topk_weights)
        static_y.copy_(y.to(_DEVICE))
        return want

    tag = f"rank {rank} graph(hook={use_hook})"
    for it in range(3):
        want = load(it)
        both.replay()
        torch.cuda.synchronize()
        _check_dispatch(f"{tag} both {it}", g_recv_x, g_recv_count, want[0], want[1], True)
        _check_combine(f"{tag} both combine {it}", g_out, want[2])
    for it in range(3, 7):
        want = load(it)
        if it == 5:
            # An eager op between replays: the graphs now run at the other parity than at capture.
            buf.low_latency_dispatch(static_x, static_idx, TOKENS, num_experts, **mode)
        only_dispatch.replay()
        only_combine.replay()
        torch.cuda.synchronize()
        _check_dispatch(f"{tag} split {it}", d_recv_x, d_recv_count, want[0], want[1], True)
        _check_combine(f"{tag} split combine {it}", d_out, want[2])
    del both, only_dispatch, only_combine
    torch.cuda.synchronize()


def _check_no_host_sync(rank, world, buf, num_experts, num_topk, seed):
    """A low-latency round with hooks never synchronises the host with the GPU (torch's sync debug
    mode raises on any synchronising call; the emulator's counterpart is _check_bad_ids' count of
    host reads of topk_idx)."""
    case = _Case(seed + 900, rank, world, TOKENS, HIDDEN, num_topk, num_experts)
    y = _expert_outputs(seed + 900, rank, num_experts // world, world * TOKENS, HIDDEN).to(_DEVICE)
    synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, _, handle, _, hook = buf.low_latency_dispatch(case.x, case.topk_idx, TOKENS, num_experts, use_fp8=True,
                                                         return_recv_hook=True)
        hook()
        _, _, hook = buf.low_latency_combine(y, case.topk_idx, case.topk_weights, handle, return_recv_hook=True)
        hook()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    synchronize()


def _check_relayout(rank, world, buf, ref, seed):
    """Other (T, H, E): refused without clean, fine after it; a size that does not fit is refused."""
    num_experts = 2 * world
    num_topk = min(3, num_experts)
    case = _Case(seed + 400, rank, world, TOKENS_2, HIDDEN_2, num_topk, num_experts)
    with pytest.raises(ValueError, match="clean_low_latency_buffer"):
        buf.low_latency_dispatch(case.x, case.topk_idx, TOKENS_2, num_experts, use_fp8=False)
    buf.clean_low_latency_buffer(TOKENS_2, HIDDEN_2, num_experts)
    ref.clean_low_latency_buffer(TOKENS_2, HIDDEN_2, num_experts)  # the reference keeps one layout too
    rows = world * TOKENS_2
    y = _expert_outputs(seed + 400, rank, num_experts // world, rows, HIDDEN_2)
    want = _reference_round(ref, case, TOKENS_2, num_experts, y, use_fp8=False)
    recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(case.x, case.topk_idx, TOKENS_2, num_experts,
                                                               use_fp8=False)
    _check_dispatch(f"rank {rank} relayout", recv_x, recv_count, want[0], want[1], False)
    out, _, _ = buf.low_latency_combine(y.to(_DEVICE), case.topk_idx, case.topk_weights, handle)
    _check_combine(f"rank {rank} relayout combine", out, want[2])

    huge = 1 << 16
    with pytest.raises(ValueError, match="num_rdma_bytes >="):
        buf.clean_low_latency_buffer(huge, HIDDEN_2, num_experts)


def _check_timeout(rank, world, group, ref, num_experts, num_topk, seed, p2p):
    """Rank 0 skips a dispatch: every other rank's receive times out into a Python error, and
    clean_low_latency_buffer brings the buffer back. Then, on the same short-timeout buffer, the
    cases that need a device timeout or a recorded error (each ends with a clean)."""
    os.environ["EP_COMM_TIMEOUT_S"] = "3"
    # Ranks skip calls on purpose here: the kernels' device checks are under test, not the host agreement.
    os.environ["EP_COMM_AGREE"] = "0"
    size = ep_comm.Buffer.get_low_latency_rdma_size_hint(TOKENS, HIDDEN, world, num_experts)
    short = ep_comm.Buffer(group, 0, size, low_latency_mode=True, backend=KERNELS,  # shares NVSHMEM
                           allow_nvlink_for_low_latency_mode=p2p)
    os.environ["EP_COMM_TIMEOUT_S"] = TIMEOUT_S
    os.environ.pop("EP_COMM_AGREE")
    case = _Case(seed + 500, rank, world, TOKENS, HIDDEN, num_topk, num_experts)
    if rank != 0:
        short.low_latency_dispatch(case.x, case.topk_idx, TOKENS, num_experts, use_fp8=False)
        synchronize()
        with pytest.raises(ep_comm.EpCommTimeout, match=f"rank {rank} timed out in phase low-latency-dispatch-recv"):
            short.low_latency_dispatch(case.x, case.topk_idx, TOKENS, num_experts, use_fp8=False)
    dist.barrier(group)
    short.clean_low_latency_buffer(TOKENS, HIDDEN, num_experts)
    rows = world * TOKENS
    y = _expert_outputs(seed + 500, rank, num_experts // world, rows, HIDDEN)
    want = _reference_round(ref, case, TOKENS, num_experts, y, use_fp8=False)
    recv_x, recv_count, handle, _, _ = short.low_latency_dispatch(case.x, case.topk_idx, TOKENS, num_experts,
                                                                 use_fp8=False)
    _check_dispatch(f"rank {rank} after timeout", recv_x, recv_count, want[0], want[1], False)
    out, _, _ = short.low_latency_combine(y.to(_DEVICE), case.topk_idx, case.topk_weights, handle)
    _check_combine(f"rank {rank} after timeout combine", out, want[2])
    synchronize()
    _check_bad_ids(rank, world, group, short, num_experts, num_topk, seed)
    _check_no_send_after_failed_credit(rank, world, group, short, ref, num_experts, num_topk, seed)
    _check_failed_launch(rank, world, group, short, ref, num_experts, num_topk, seed)
    synchronize()
    short.destroy()


def _check_bad_ids(rank, world, group, buf, num_experts, num_topk, seed):
    """Bad expert ids are found on the device, not by reading topk_idx on the host (a sync the
    low-latency mode must not make): rank 0 names one expert twice in a token, rank 1 names an
    expert that does not exist; each raises at its next check, naming itself. The peers receive."""
    case = _Case(seed + 600, rank, world, TOKENS, HIDDEN, num_topk, num_experts)
    topk_idx = case.topk_idx.clone()
    if rank == 0:
        topk_idx[0, 1] = topk_idx[0, 0] = 0
    elif rank == 1:
        topk_idx[0, 0] = num_experts
    reads = validation.host_value_reads
    try:
        buf.low_latency_dispatch(case.x, topk_idx, TOKENS, num_experts, use_fp8=False)
    except RuntimeError as e:  # the emulator ends every call with a sync, so the hook's check may see it
        assert rank in (0, 1) and "met invalid input" in str(e), f"rank {rank}: {e}"
    synchronize()
    assert validation.host_value_reads == reads, "a low-latency kernel call read topk_idx on the host"
    if rank in (0, 1):
        with pytest.raises(RuntimeError, match=f"rank {rank} met invalid input in phase low-latency-dispatch-send"):
            buf.check_errors()
    else:
        buf.check_errors()
    dist.barrier(group)
    buf.clean_low_latency_buffer(TOKENS, HIDDEN, num_experts)


def _check_no_send_after_failed_credit(rank, world, group, buf, ref, num_experts, num_topk, seed):
    """A send whose credit wait timed out must write nothing into the slow peer's buffer half.

    Every rank sends op A with a hook; all but rank 1 receive it at once. Rank 0 then sends B and
    C: C reuses A's half and waits for every peer's receive of A, which rank 1 has not run, so
    C's wait times out. Only then does rank 1 receive A: it must get A's rows, not C's."""
    cases = [_Case(seed + 700 + j, rank, world, TOKENS, HIDDEN, num_topk, num_experts) for j in range(3)]
    want_a = _reference_round(ref, cases[0], TOKENS, num_experts,
                              _expert_outputs(seed + 700, rank, num_experts // world, world * TOKENS, HIDDEN),
                              use_fp8=False)
    a = buf.low_latency_dispatch(cases[0].x, cases[0].topk_idx, TOKENS, num_experts, use_fp8=False,
                                 return_recv_hook=True)
    if rank != 1:
        a[4]()
    if rank == 0:
        b = buf.low_latency_dispatch(cases[1].x, cases[1].topk_idx, TOKENS, num_experts, use_fp8=False,
                                     return_recv_hook=True)
        buf.low_latency_dispatch(cases[2].x, cases[2].topk_idx, TOKENS, num_experts, use_fp8=False,
                                 return_recv_hook=True)
    synchronize()
    dist.barrier(group)
    if rank == 1:
        a[4]()
        synchronize()
        _check_dispatch(f"rank {rank} op received after a peer's credit timeout", a[0], a[1], want_a[0], want_a[1],
                        False)
    if rank == 0:
        with pytest.raises(RuntimeError, match="rank 0 timed out in phase low-latency-dispatch-send waiting for peer 1"):
            b[4]()
    dist.barrier(group)
    buf.clean_low_latency_buffer(TOKENS, HIDDEN, num_experts)


class _FailingRuntime:
    """The runtime with a dispatch_send that raises once (a launch that fails on the host)."""

    def __init__(self, runtime):
        self._runtime = runtime
        self.fail_next = True

    def dispatch_send(self, *args):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected launch failure")
        return self._runtime.dispatch_send(*args)

    def __getattr__(self, name):
        return getattr(self._runtime, name)


def _check_failed_launch(rank, world, group, buf, ref, num_experts, num_topk, seed):
    """A send launch that raises does not count as an op: with A's hook pending, a failed launch
    and B sent, a third op must still be refused on the host (it would reuse A's half)."""
    backend = buf._low_latency
    case = _Case(seed + 800, rank, world, TOKENS, HIDDEN, num_topk, num_experts)
    send = lambda: buf.low_latency_dispatch(case.x, case.topk_idx, TOKENS, num_experts, use_fp8=False,  # noqa: E731
                                            return_recv_hook=True)
    a = send()
    backend._runtime = _FailingRuntime(backend._runtime)
    try:
        with pytest.raises(RuntimeError, match="injected launch failure"):
            send()
    finally:
        backend._runtime = backend._runtime._runtime
    b = send()
    with pytest.raises(RuntimeError, match="has not been called"):
        send()
    a[4]()
    b[4]()
    synchronize()
    want = _reference_round(ref, case, TOKENS, num_experts,
                            _expert_outputs(seed + 800, rank, num_experts // world, world * TOKENS, HIDDEN),
                            use_fp8=False)
    for tag, op in (("A", a), ("B", b)):
        _check_dispatch(f"rank {rank} after a failed launch, op {tag}", op[0], op[1], want[0], want[1], False)
    dist.barrier(group)


def _body(rank: int, world: int, group, seed: int, p2p: bool) -> None:
    global _DEVICE
    _DEVICE = setup_device(rank)
    os.environ["EP_COMM_TIMEOUT_S"] = TIMEOUT_S
    print(f"rank {rank}/{world}: seed {seed}", flush=True)
    num_experts = 3 * world
    num_topk = min(5, num_experts)
    size = max(ep_comm.Buffer.get_low_latency_rdma_size_hint(TOKENS, HIDDEN, world, num_experts),
               ep_comm.Buffer.get_low_latency_rdma_size_hint(TOKENS_2, HIDDEN_2, world, 2 * world))
    buf = ep_comm.Buffer(group, 0, size, low_latency_mode=True, backend=KERNELS,
                         allow_nvlink_for_low_latency_mode=p2p)
    ref = ep_comm.Buffer(group, 0, size, low_latency_mode=True, backend="reference")
    assert buf.backend_kind == KERNELS
    if EMULATED:
        # NVSHMEM maps every peer for direct stores (P2P), or none (every row is an NVSHMEM put).
        assert [buf._low_latency._runtime.peer_is_p2p(p) for p in range(world)] == \
            [p2p or p == rank for p in range(world)], "the emulated NVSHMEM's transport is not the one asked for"

    _check_modes_and_options(rank, world, buf, ref, num_experts, num_topk, seed)
    _check_hooks(rank, world, buf, ref, num_experts, num_topk, seed)
    _check_back_to_back(rank, world, buf, ref, num_experts, num_topk, seed)
    if not EMULATED:  # CUDA graphs and torch's sync debug mode need a GPU
        _check_no_host_sync(rank, world, buf, num_experts, num_topk, seed)
        for use_hook in (False, True):
            _check_graphs(rank, world, buf, ref, num_experts, num_topk, seed, use_hook)
    _check_relayout(rank, world, buf, ref, seed)
    ref.clean_low_latency_buffer(TOKENS, HIDDEN, num_experts)
    if world >= 2:
        _check_timeout(rank, world, group, ref, num_experts, num_topk, seed, p2p)
    # Collective, in the same order everywhere (only on success: a failing rank must not block
    # its peers in a collective free).
    synchronize()
    buf.destroy()
    ref.destroy()


@pytest.mark.parametrize("path", ["p2p", "put"])
@pytest.mark.parametrize("world", [2, 4, 8])
def test_low_latency_against_reference(world, path):
    """path: 'p2p' stores rows directly into peers' buffers (NVLink, as on one node); 'put' sends
    every row as an NVSHMEM put-with-signal (the network path, which the emulator runs by mapping
    no peer: allow_nvlink_for_low_latency_mode=False sets NVSHMEM_DISABLE_P2P)."""
    if path == "put" and not EMULATED:
        pytest.skip("the put path needs a network transport between the ranks; one GPU has none")
    run_ranks(_body, world, timeout_s=600.0, seed=SEED + world, p2p=path == "p2p")
