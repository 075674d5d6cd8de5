"""`deep_ep.utils` names that frameworks import: EventHandle and EventOverlap.

Megatron-LM builds `EventOverlap(EventHandle())` to order the communication stream after the work
already queued on the current stream; ep_comm.Buffer takes a plain `torch.cuda.Event` inside its
EventOverlap, so the drop-in Buffer unwraps an EventHandle (see `plain_event`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ep_comm.event import EventOverlap


class EventHandle:
    """An event recorded on the current CUDA stream when made (DeepEP's `EventHandle()`).

    `event` is the `torch.cuda.Event`, or None without CUDA (CPU tensors finish inline, so there is
    nothing to wait for)."""

    def __init__(self) -> None:
        self.event: Optional["torch.cuda.Event"] = None
        if torch.cuda.is_available():
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


def plain_event(previous_event: Any) -> Any:
    """previous_event as ep_comm.Buffer takes it: an EventHandle, alone or inside an EventOverlap,
    becomes an EventOverlap of its torch.cuda.Event (None without CUDA: then the call waits for the
    current stream, which is what an EventHandle made just before records anyway)."""
    if isinstance(previous_event, EventHandle):
        return EventOverlap(previous_event.event)
    if isinstance(previous_event, EventOverlap) and isinstance(previous_event.event, EventHandle):
        return EventOverlap(previous_event.event.event, previous_event.extra_tensors)
    return previous_event


__all__ = ["EventHandle", "EventOverlap", "plain_event"]
