"""NVSHMEM's lifetime, shared by the low-latency and internode backends.

NVSHMEM is initialised once per process, so the backends share it through a process-wide
reference count kept in C++ (`_C.nvshmem_acquire` / `nvshmem_release`); whichever backend comes
first initialises it from rank 0's unique id, all-gathered over the Buffer's group.
"""
from __future__ import annotations

import os

import torch.distributed as dist

from ep_comm.backends.base import BackendContext

DEFAULT_SYMMETRIC_HEAP = 1 << 30    # NVSHMEM's own default (1 GiB)
HEAP_HEADROOM = 128 << 20           # NVSHMEM's internal allocations share the heap


def _symmetric_buffers(ctx: BackendContext) -> int:
    """How many buffers of num_rdma_bytes one Buffer allocates: low-latency, internode, or both."""
    internode = ctx.num_nodes > 1 and (ctx.num_nvl_bytes > 0 or not ctx.low_latency_mode)
    return int(ctx.low_latency_mode) + int(internode)


def configure_environment(ctx: BackendContext, C) -> None:
    """Defaults NVSHMEM reads at initialisation; a variable the user set always wins."""
    if C.nvshmem_reference_count() > 0:
        return  # already initialised in this process: its settings are fixed
    env = os.environ
    if ctx.low_latency_mode and not ctx.allow_nvlink_for_low_latency_mode and ctx.num_nodes == 1:
        # Send even NVLink peers through the network transport, as DeepEP does. (Internode needs
        # nvshmem_ptr to its node's peers, so the switch is honoured only where no internode buffer is.)
        env.setdefault("NVSHMEM_DISABLE_P2P", "1")
    # No multicast objects and no NVSHMEM collectives are used: skip NVLS set-up, and keep NVSHMEM
    # from loading NCCL (which refuses several ranks per GPU and may clash with torch's).
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    env.setdefault("NVSHMEM_DISABLE_NCCL", "1")
    if env.get("NVSHMEM_IB_ENABLE_IBGDA", "0").lower() in ("1", "true", "yes", "on"):
        env.setdefault("NVSHMEM_IBGDA_NUM_RC_PER_PE", str(ctx.num_qps_per_rank))
    # Reserve every buffer up front rather than rely on the heap growing later.
    needed = max(1, _symmetric_buffers(ctx)) * ctx.num_rdma_bytes + HEAP_HEADROOM
    if needed > DEFAULT_SYMMETRIC_HEAP:
        env.setdefault("NVSHMEM_SYMMETRIC_SIZE", str((needed + (2 << 20) - 1) // (2 << 20) * (2 << 20)))


def acquire(ctx: BackendContext, C, device_index: int) -> None:
    """Initialise NVSHMEM (rank 0's unique id, all-gathered over ctx.group) or take another reference.

    Collective over ctx.group. The caller owns one reference and gives it back with
    `C.nvshmem_release()`.
    """
    configure_environment(ctx, C)
    initialized = C.nvshmem_reference_count() > 0
    unique_id = C.nvshmem_get_unique_id() if ctx.rank == 0 and not initialized else None
    gathered = [None] * ctx.num_ranks
    dist.all_gather_object(gathered, (initialized, unique_id), group=ctx.group)
    if len({bool(g[0]) for g in gathered}) > 1:
        ready = [r for r, g in enumerate(gathered) if g[0]]
        raise RuntimeError(f"ranks {ready} already initialised NVSHMEM and the others did not: create and destroy "
                           "NVSHMEM Buffers in the same order on every rank")
    root_id = gathered[0][1] if not initialized else b""
    # NVSHMEM numbers PEs once, at initialisation: a later Buffer may share it only over the same
    # group (same members, same order), which the key identifies.
    group_key = ",".join(str(r) for r in dist.get_process_group_ranks(ctx.group))
    C.nvshmem_acquire(root_id or b"", ctx.rank, ctx.num_ranks, device_index, group_key)
