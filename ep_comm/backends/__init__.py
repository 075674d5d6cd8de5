"""Backends behind Buffer: the torch.distributed reference and the CUDA kernels."""
from __future__ import annotations

from ep_comm.backends.base import Backend, BackendContext


def make_backend(kind: str, ctx: BackendContext) -> Backend:
    """kind: 'reference', 'intranode', 'internode' or 'low_latency'. Kernel modules import lazily."""
    if kind == "reference":
        from ep_comm.backends.reference import ReferenceBackend
        return ReferenceBackend(ctx)
    if kind == "intranode":
        from ep_comm.backends.intranode import IntranodeBackend
        return IntranodeBackend(ctx)
    if kind == "internode":
        from ep_comm.backends.internode import InternodeBackend
        return InternodeBackend(ctx)
    if kind == "low_latency":
        from ep_comm.backends.low_latency import LowLatencyBackend
        return LowLatencyBackend(ctx)
    raise ValueError(f"unknown backend {kind!r}; expected reference, intranode, internode or low_latency")
