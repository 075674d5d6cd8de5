"""Backends behind Buffer: the torch.distributed reference, and the kernels on a GPU or on the
emulated device (backends/target.py)."""
from __future__ import annotations

from typing import Optional

from ep_comm.backends.base import Backend, BackendContext
from ep_comm.backends.target import KernelTarget


def make_backend(kind: str, ctx: BackendContext, target: Optional[KernelTarget] = None) -> Backend:
    """kind: 'reference', 'intranode', 'internode' or 'low_latency'. Kernel modules import lazily.
    `target`: where a kernel family runs (default: the CUDA kernels on ctx.device); a family the
    target cannot run yet raises NotImplementedError."""
    if kind == "reference":
        from ep_comm.backends.reference import ReferenceBackend
        return ReferenceBackend(ctx)
    if target is not None:
        target.require_family(kind)
    if kind == "intranode":
        from ep_comm.backends.intranode import IntranodeBackend
        return IntranodeBackend(ctx, target)
    if kind == "internode":
        from ep_comm.backends.internode import InternodeBackend
        return InternodeBackend(ctx, target)
    if kind == "low_latency":
        from ep_comm.backends.low_latency import LowLatencyBackend
        return LowLatencyBackend(ctx, target)
    raise ValueError(f"unknown backend {kind!r}; expected reference, intranode, internode or low_latency")
