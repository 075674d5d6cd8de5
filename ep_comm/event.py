"""EventOverlap: a CUDA event plus the tensors that must stay alive until it completes."""
from __future__ import annotations

from typing import Any, Optional

import torch


class EventOverlap:
    """What async calls return (DeepEP-compatible).

    `event` is a `torch.cuda.Event` recorded on the communication stream, or None where the call
    already finished (CPU tensors, or `async_finish=False`). `extra_tensors` are kept referenced so
    the caching allocator cannot reuse their memory before the event completes.
    """

    def __init__(self, event: Optional["torch.cuda.Event"] = None, extra_tensors: Optional[tuple] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for the event (no-op without one)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap(event={'set' if self.event is not None else None})"


def event_to_wait_for(previous_event) -> Optional["torch.cuda.Event"]:
    """The event a call's communication stream waits for before it starts, or None when it must
    wait for the current compute stream instead (DeepEP's default).

    previous_event: None, a torch.cuda.Event, or an EventOverlap. An EventOverlap without an event
    (what every call returns that already finished, e.g. with async_finish=False) orders nothing,
    so it counts as None: waiting on it would leave the comm stream unordered with the compute
    stream that produced the inputs.
    """
    return previous_event.event if isinstance(previous_event, EventOverlap) else previous_event

