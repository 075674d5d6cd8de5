"""Single-process checks of the API surface: configs, size hints, events, backend choice, the
async/event arguments on CPU. Multi-rank behaviour lives in test_reference.py."""
from __future__ import annotations

import contextlib

import pytest
import torch

import ep_comm
from ep_comm import Buffer, Config, EventOverlap
from ep_comm.buffer import _backend_choice
from dist import run_ranks
from ep_comm.testing import expected_dispatch, make_inputs


def test_config_validation_and_hints():
    with pytest.raises(ValueError, match="even"):
        Config(num_sms=3)
    with pytest.raises(ValueError, match="chunked"):
        Config(20, 8, 8)
    config = Buffer.get_dispatch_config(8)
    assert isinstance(config, Config) and config.num_sms == Buffer.num_sms
    small = config.get_nvl_buffer_size_hint(1024, 8)
    large = config.get_nvl_buffer_size_hint(14336, 8)
    assert 0 < small < large
    assert Buffer.get_low_latency_rdma_size_hint(64, 1024, 4, 16) < Buffer.get_low_latency_rdma_size_hint(128, 1024, 4, 16)


def test_set_num_sms():
    before = Buffer.num_sms
    try:
        Buffer.set_num_sms(24)
        assert Buffer.get_combine_config(4).num_sms == 24
        for bad in (0, 7, -2, 2.0):
            with pytest.raises(ValueError):
                Buffer.set_num_sms(bad)
    finally:
        Buffer.num_sms = before


def test_events_without_cuda():
    event = Buffer.capture()
    assert isinstance(event, EventOverlap)
    with event as same:
        assert same is event
    event.current_stream_wait()


class _RecordingStream:
    """Stands in for a torch.cuda.Stream: records what it was made to wait for."""

    def __init__(self) -> None:
        self.waited = []

    def wait_event(self, event) -> None:
        self.waited.append(("event", event))

    def wait_stream(self, stream) -> None:
        self.waited.append(("stream", stream))


def test_comm_stream_waits_for_compute_unless_given_an_event(monkeypatch):
    """DeepEP: without previous_event the communication stream waits for the current (compute)
    stream. EventOverlap(None), what every call that already finished returns, must count as no
    event: waiting on nothing would let the kernels read inputs the compute stream is still writing."""
    compute, comm = _RecordingStream(), _RecordingStream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *args, **kwargs: compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    buffer = Buffer.__new__(Buffer)  # only _launch's stream logic is exercised: no group, no GPU
    buffer._comm_stream = comm
    event = object()
    for previous, want in ((None, ("stream", compute)), (EventOverlap(None), ("stream", compute)),
                           (EventOverlap(event), ("event", event)), (event, ("event", event))):
        comm.waited.clear()
        result, overlap = buffer._launch(lambda: "ran", [], previous, async_finish=False,
                                         allocate_on_comm_stream=False, on_gpu=True)
        assert result == "ran" and overlap.event is None
        assert comm.waited == [want], (previous, comm.waited)
        assert compute.waited[-1] == ("stream", comm)  # not async: the caller's stream waits for the call


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("EP_COMM_BACKEND", raising=False)
    assert _backend_choice("reference") == "reference"
    with pytest.raises(ValueError, match="backend must be"):
        _backend_choice("nccl")
    if not (ep_comm._ext.gpu_available() and torch.cuda.is_available()):
        assert _backend_choice(None) == "reference"
        with pytest.raises(RuntimeError, match="unavailable"):
            _backend_choice("kernels")
        monkeypatch.setenv("EP_COMM_BACKEND", "kernels")
        with pytest.raises(RuntimeError, match="unavailable"):
            _backend_choice(None)


class _BuiltFor:
    """Stands in for ep_comm._C: only its build_info."""

    def __init__(self, archs: str) -> None:
        self.archs = archs

    def build_info(self) -> dict:
        return {"cuda_archs": self.archs}


def test_is_sm90_compiled_reports_the_built_architectures(monkeypatch):
    for archs, want in (("90", True), ("90a;100a", True), ("80;86+PTX", False), ("100a", True), ("80", False)):
        monkeypatch.setattr(ep_comm._ext, "load", lambda archs=archs: _BuiltFor(archs))
        assert Buffer.is_sm90_compiled() is want, archs
    monkeypatch.setattr(ep_comm._ext, "load", lambda: None)
    assert not Buffer.is_sm90_compiled() and ep_comm._ext.compiled_cuda_archs() == []


def _async_body(rank, world, group):
    buffer = Buffer(group)
    inputs = [make_inputs(5, r, 6, 256, 2, 2 * world) for r in range(world)]
    mine = inputs[rank]
    previous = Buffer.capture()
    per_rank, _, per_expert, in_rank, event = buffer.get_dispatch_layout(
        mine.topk_idx, 2 * world, previous_event=previous, async_finish=True, allocate_on_comm_stream=True)
    assert isinstance(event, EventOverlap)
    recv_x, _, _, _, handle, event = buffer.dispatch(
        mine.x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=mine.topk_idx, previous_event=event, async_finish=True)
    event.current_stream_wait()
    assert torch.equal(recv_x, expected_dispatch(inputs, rank, 2 * world).recv_x)
    with pytest.raises(ValueError, match="allocate_on_comm_stream"):
        buffer.combine(recv_x, handle, allocate_on_comm_stream=True)
    combined, _, event = buffer.combine(recv_x, handle, async_finish=True)
    with event:
        assert combined.shape == mine.x.shape
    buffer.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.combine(recv_x, handle)


def test_async_arguments_on_cpu():
    run_ranks(_async_body, 2)
