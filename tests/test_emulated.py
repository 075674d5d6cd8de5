"""Buffer(backend="emulated"): the intranode kernel backend over ep_comm._C_emu, CPU tensors.

What the emulated backend must share with the kernels on a GPU: the backend choice, the refusals
(wrong device, misaligned inputs, a buffer too small, more channels than SMs), the families it does
not run yet, and the overlap arguments. Correctness against the reference is tests/gpu/, which
runs on the emulator too. Multi-rank cases skip without ep_comm._C_emu; the choice tests run always.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ep_comm
from ep_comm import _ext
from ep_comm.buffer import _backend_choice
from ep_comm.config import Config
from ep_comm.event import EventOverlap
from ep_comm.testing import expected_dispatch, make_inputs
from dist import run_ranks
from test_validation import misaligned

needs_emulator = pytest.mark.skipif(not _ext.emulated_available(),
                                    reason=f"ep_comm._C_emu is not built: {_ext.emulated_unavailable_reason()}")
HIDDEN = 256
SEED = 20261206


def test_auto_never_picks_the_emulator(monkeypatch):
    monkeypatch.delenv("EP_COMM_BACKEND", raising=False)
    if not (_ext.gpu_available() and torch.cuda.is_available()):
        assert _backend_choice(None) == "reference"
        assert _backend_choice("auto") == "reference"
    if _ext.emulated_available():
        assert _backend_choice("emulated") == "emulated"
        monkeypatch.setenv("EP_COMM_BACKEND", "emulated")
        assert _backend_choice(None) == "emulated"
    else:
        with pytest.raises(RuntimeError, match="emulated device was requested but is unavailable"):
            _backend_choice("emulated")


def _layout_args(layout):
    return dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])


def _refusals_body(rank, world, group):
    num_experts = 2 * world
    config = Config(num_sms=4, num_max_nvl_chunked_send_tokens=2, num_max_nvl_chunked_recv_tokens=8)
    nvl_bytes = config.get_nvl_buffer_size_hint(HIDDEN * 2, world)
    inputs = [make_inputs(SEED, r, 6 + r, HIDDEN, 2, num_experts) for r in range(world)]
    mine = inputs[rank]

    # A low-latency Buffer runs the low-latency kernels (tests/gpu/test_low_latency.py): without an
    # NVSHMEM buffer it is refused as on a GPU, never served by the reference.
    with pytest.raises(ValueError, match="low_latency_mode=True needs num_rdma_bytes > 0"):
        ep_comm.Buffer(group, num_nvl_bytes=nvl_bytes, low_latency_mode=True, backend="emulated")

    buffer = ep_comm.Buffer(group, num_nvl_bytes=nvl_bytes, backend="emulated")
    try:
        assert buffer.backend_kind == "emulated" and buffer.device == torch.device("cpu")
        assert buffer._normal.name == "intranode" and buffer.get_comm_stream() is None
        layout = buffer.get_dispatch_layout(mine.topk_idx, num_experts)

        # The buffer's device is the CPU: other devices are refused as kernels refuse CPU tensors.
        with pytest.raises(ValueError, match="is on meta, but this call runs on cpu"):
            buffer.dispatch(mine.x.to("meta"), topk_idx=mine.topk_idx, config=config, **_layout_args(layout))
        with pytest.raises(ValueError, match=r"x must start on a 16-byte boundary.*mod 16 = 2"):
            buffer.dispatch(misaligned(mine.x), topk_idx=mine.topk_idx, config=config, **_layout_args(layout))
        # More channels than the emulated device has SMs (EP_COMM_EMU_NUM_SMS=4 in this test).
        with pytest.raises(ValueError, match="needs 6 SMs resident at once, but the emulated device has 4"):
            buffer.dispatch(mine.x, topk_idx=mine.topk_idx, config=Config(num_sms=6), **_layout_args(layout))
        # A ring bigger than the buffer.
        with pytest.raises(RuntimeError, match="bytes of NVLink buffer"):
            buffer.dispatch(mine.x, topk_idx=mine.topk_idx, **_layout_args(layout),
                            config=Config(num_sms=4, num_max_nvl_chunked_send_tokens=6,
                                          num_max_nvl_chunked_recv_tokens=512))

        # The overlap arguments work as on CPU: the call has finished, the event is empty.
        previous = ep_comm.Buffer.capture()
        recv_x, _, _, _, handle, event = buffer.dispatch(
            mine.x, topk_idx=mine.topk_idx, config=config, previous_event=previous, async_finish=True,
            allocate_on_comm_stream=True, **_layout_args(layout))
        assert isinstance(event, EventOverlap) and event.event is None
        assert torch.equal(recv_x, expected_dispatch(inputs, rank, num_experts).recv_x)
        combined, _, event = buffer.combine(recv_x, handle, config=config, previous_event=event, async_finish=True)
        with event:  # every copy came back unchanged: the sum is x times its number of ranks
            assert torch.equal(combined, (mine.x.float() * layout[3].sum(1, keepdim=True).float()).bfloat16())
        with pytest.raises(ValueError, match=r"x must start.*mod 16 = 2"):
            buffer.combine(misaligned(recv_x), handle, config=config)
        buffer.check_errors()
        dist.barrier(group)
    finally:
        buffer.destroy()

    # A Buffer without an NVLink buffer refuses dispatch, as a kernel Buffer does.
    empty = ep_comm.Buffer(group, backend="emulated")
    with pytest.raises(RuntimeError, match="needs a buffer"):
        empty.dispatch(mine.x, topk_idx=mine.topk_idx, **_layout_args(layout))
    empty.destroy()


@needs_emulator
def test_emulated_buffer_refuses_like_the_kernels(monkeypatch):
    monkeypatch.setenv("EP_COMM_EMU_NUM_SMS", "4")
    run_ranks(_refusals_body, 2)


def _multi_node_body(rank, world, group):
    # Emulated nodes run the internode kernels (tests/gpu/test_internode.py), which need the NVSHMEM
    # buffer: refused on every rank, naming the size hint, as a GPU Buffer is.
    with pytest.raises(ValueError, match="num_rdma_bytes > 0"):
        ep_comm.Buffer(group, num_nvl_bytes=1 << 20, backend="emulated")


@needs_emulator
def test_emulated_multi_node_buffer_without_rdma_bytes_is_refused(monkeypatch):
    monkeypatch.setenv("EP_COMM_RANKS_PER_NODE", "1")
    run_ranks(_multi_node_body, 2)


def _plain_functions_body(rank, world, group):
    """ep_comm.dispatch/combine (cached Buffer, default Configs) with EP_COMM_BACKEND=emulated."""
    num_experts = 3 * world
    inputs = [make_inputs(SEED + 1, r, 5 + 3 * r, HIDDEN, 3, num_experts) for r in range(world)]
    mine = inputs[rank]
    result = ep_comm.dispatch(mine.x, mine.topk_idx, mine.topk_weights, num_experts=num_experts, group=group)
    buffer = ep_comm.api.get_buffer(group)
    try:
        assert buffer.backend_kind == "emulated" and buffer._normal.name == "intranode"
        want = expected_dispatch(inputs, rank, num_experts)
        assert torch.equal(result.recv_x, want.recv_x)
        assert torch.equal(result.recv_topk_idx, want.recv_topk_idx)
        assert torch.equal(result.recv_topk_weights, want.recv_topk_weights)
        assert result.num_recv_tokens_per_expert == want.num_recv_tokens_per_expert
        combined = ep_comm.combine(result.recv_x, result.handle).combined_x
        in_rank = buffer.get_dispatch_layout(mine.topk_idx, num_experts)[3]
        assert torch.equal(combined, (mine.x.float() * in_rank.sum(1, keepdim=True).float()).bfloat16())
        dist.barrier(group)
    finally:
        buffer.destroy()


@needs_emulator
def test_plain_functions_run_on_the_emulator(monkeypatch):
    monkeypatch.setenv("EP_COMM_BACKEND", "emulated")
    run_ranks(_plain_functions_body, 2)


class _RecordingEmulator:
    """Stands in for ep_comm._C_emu where it is not built: the real size functions and limits of
    ep_comm._C, launches that only record (device, stream) and a synchronize that counts. It checks
    the wiring of the emulated target, not the kernels."""

    def __init__(self, real, calls: list) -> None:
        self._real = real
        self.calls = calls
        self.fail_next_dispatch = False
        emulator = self

        class IntranodeBuffer:
            is_destroyed = False

            def __init__(self, rank, num_ranks, device, num_bytes):
                calls.append(("buffer", device))

            def ipc_handle(self):
                return b"handle"

            def open_peers(self, handles):
                pass

            def notify(self, *args):
                calls.append(("notify", args[-1]))

            def wait_recv_counts(self, num_local_experts, timeout_s):
                return 3, [3] + [0] * (num_local_experts - 1)

            def dispatch(self, *args):
                calls.append(("dispatch", args[-1]))
                if emulator.fail_next_dispatch:
                    emulator.fail_next_dispatch = False
                    raise RuntimeError("recorded device error")

            def combine(self, *args):
                calls.append(("combine", args[-1]))

            def check_error(self):
                pass

            def destroy(self):
                self.is_destroyed = True

        self.IntranodeBuffer = IntranodeBuffer

    def __getattr__(self, name):
        return getattr(self._real, name)  # sizes and INTRANODE_MAX_* constants

    def get_device_properties(self, device):
        return {"num_sms": 8}

    def get_dispatch_layout(self, *args):
        self.calls.append(("layout", args[-2], args[-1]))

    def synchronize(self):
        self.calls.append(("sync",))


def _wiring_body(rank, world, group):
    calls = []
    emulator = _RecordingEmulator(_ext.load(), calls)
    _ext._emulated.module, _ext._emulated._attempted = emulator, True  # this rank process only
    config = Config(num_sms=4, num_max_nvl_chunked_send_tokens=2, num_max_nvl_chunked_recv_tokens=8)
    buffer = ep_comm.Buffer(group, num_nvl_bytes=config.get_nvl_buffer_size_hint(HIDDEN * 2, world),
                            backend="emulated")
    mine = make_inputs(SEED, rank, 5, HIDDEN, 2, 2)
    assert calls == [("buffer", 0)]
    layout = buffer.get_dispatch_layout(mine.topk_idx, 2)
    recv_x, _, _, counts, handle, _ = buffer.dispatch(mine.x, topk_idx=mine.topk_idx, config=config,
                                                      **_layout_args(layout))
    assert recv_x.shape == (3, HIDDEN) and counts == [3, 0]
    buffer.combine(recv_x, handle, config=config)
    # Device 0 and stream 0 everywhere; every op ends with a synchronize of the emulated device.
    assert calls[1:] == [("layout", 0, 0), ("sync",), ("notify", 0), ("dispatch", 0), ("sync",), ("combine", 0),
                         ("sync",)], calls
    del calls[:]
    emulator.fail_next_dispatch = True  # an op that raises after launching still synchronizes
    with pytest.raises(RuntimeError, match="recorded device error"):
        buffer.dispatch(mine.x, handle=handle, config=config)
    assert calls == [("dispatch", 0), ("sync",)], calls
    with pytest.raises(ValueError, match="needs 10 SMs resident at once, but the emulated device has 8"):
        buffer.dispatch(mine.x, topk_idx=mine.topk_idx, config=Config(num_sms=10), **_layout_args(layout))
    buffer.destroy()


@pytest.mark.skipif(_ext.load() is None, reason="the recording emulator borrows ep_comm._C's size functions")
def test_emulated_target_wiring_with_a_recording_module():
    run_ranks(_wiring_body, 1)
