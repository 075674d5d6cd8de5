"""NVSHMEM's lifetime, shared by the low-latency and internode backends.

NVSHMEM is initialised once per process, so the backends share it through a process-wide
reference count kept in C++ (`_C.nvshmem_acquire` / `nvshmem_release`); whichever backend comes
first initialises it from rank 0's unique id, all-gathered over the Buffer's group.

NVSHMEM ends the process (exit(), or a crash) on some bad inputs even through the initialisation
path that returns errors, and its initialisation is collective: a rank that raises alone leaves
its peers waiting in NVSHMEM's bootstrap or in the next collective (nvshmem_malloc) for ever. So
`acquire` checks every input it can before NVSHMEM sees it, and the ranks agree at each step:
every rank's checks (all-gathered; all go on, or all raise the same error), rank 0's unique id,
and every rank's outcome of the initialisation (all go on, or all raise, naming the failed ranks).
The verdicts are plain functions of the gathered records (`agreement_error`, `unique_id_error`,
`outcome_error`), so every rank reaches the same one.
"""
from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from ep_comm import agreement
from ep_comm.backends.base import BackendContext

DEFAULT_SYMMETRIC_HEAP = 1 << 30    # NVSHMEM's own default (1 GiB)
HEAP_HEADROOM = 128 << 20           # NVSHMEM's internal allocations share the heap

# NVSHMEM's variables of kind "size". It parses them with sscanf("%lf%c") plus a K/M/G/T suffix;
# on a value it cannot parse it stops reading its options there and leaves every later one zero:
# a malformed NVSHMEM_SYMMETRIC_SIZE crashes the process (SIGSEGV, already in rank 0's
# nvshmemx_get_uniqueid), the others leave NULL strings and zero sizes for initialisation to trip
# over. We accept a stricter subset that NVSHMEM certainly reads the same way.
_SIZE_VARIABLES = ("NVSHMEM_SYMMETRIC_SIZE", "NVSHMEM_MAX_MEMORY_PER_GPU", "NVSHMEM_CUMEM_GRANULARITY",
                   "NVSHMEM_FCOLLECT_LL_THRESHOLD", "NVSHMEM_FCOLLECT_LL128_THRESHOLD",
                   "NVSHMEM_FCOLLECT_NVLS_THRESHOLD", "NVSHMEM_REDUCESCATTER_NVLS_THRESHOLD",
                   "NVSHMEM_REDUCE_SCRATCH_SIZE")
_POSITIVE_SIZE_VARIABLES = ("NVSHMEM_SYMMETRIC_SIZE", "NVSHMEM_MAX_MEMORY_PER_GPU", "NVSHMEM_CUMEM_GRANULARITY")
_SIZE_FORMAT = re.compile(r"([0-9]+(?:\.[0-9]+)?)([kmgt]?)", re.IGNORECASE)
_SIZE_SCALE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _symmetric_buffers(ctx: BackendContext) -> int:
    """How many buffers of num_rdma_bytes one Buffer allocates: low-latency, internode, or both."""
    internode = ctx.num_nodes > 1 and (ctx.num_nvl_bytes > 0 or not ctx.low_latency_mode)
    return int(ctx.low_latency_mode) + int(internode)


def nvshmem_bool(value: Optional[str]) -> bool:
    """A boolean variable as NVSHMEM reads it: set, and not starting with 0, n, N, f or F ("" is true)."""
    return value is not None and value[:1] not in ("0", "n", "N", "f", "F")


def parse_size(value: str) -> Optional[int]:
    """Bytes of an NVSHMEM size value ("1073741824", "1G", "512m", "1.5g", "2k"), or None when it is
    not in that form (NVSHMEM itself would read "1GB" as 1 GiB and "1 G" not at all; both refused)."""
    match = _SIZE_FORMAT.fullmatch(value)
    if match is None:
        return None
    number, suffix = match.groups()
    return math.ceil(float(number) * _SIZE_SCALE[suffix.lower()])  # as NVSHMEM rounds


def check_environment(env: Optional[Dict[str, str]] = None) -> List[str]:
    """Problems with NVSHMEM variables in `env` (default os.environ) that would end the process."""
    env = os.environ if env is None else env
    problems = []
    for name in _SIZE_VARIABLES:
        value = env.get(name)
        if value is None:
            continue
        size = parse_size(value)
        if size is None:
            problems.append(f"{name}={value!r} is not a size NVSHMEM reads safely (it stops reading its settings "
                            "at a malformed one and then crashes): write bytes as digits with an optional K, M, G "
                            "or T suffix, e.g. 1073741824, 2G, 512M")
        elif size <= 0 and name in _POSITIVE_SIZE_VARIABLES:
            problems.append(f"{name}={value!r} must be positive (e.g. 2G)")
    return problems


def configure_environment(ctx: BackendContext, C) -> Dict[str, str]:
    """Defaults NVSHMEM reads at initialisation; a variable the user set always wins.

    Returns the variables it set (name -> value)."""
    if C.nvshmem_reference_count() > 0:
        return {}  # already initialised in this process: its settings are fixed
    env = os.environ
    before = dict(env)
    if ctx.low_latency_mode and not ctx.allow_nvlink_for_low_latency_mode and ctx.num_nodes == 1:
        # Send even NVLink peers through the network transport, as DeepEP does. (Internode needs
        # nvshmem_ptr to its node's peers, so the switch is honoured only where no internode buffer is.)
        env.setdefault("NVSHMEM_DISABLE_P2P", "1")
    if ctx.num_nodes == 1 and not nvshmem_bool(env.get("NVSHMEM_DISABLE_P2P")):
        # One node, P2P on: every peer is reached by P2P (NVLink, PCIe, or the same GPU), so no network
        # transport is needed, and looking for one fails or stalls on machines without NICs. With P2P
        # off (allow_nvlink_for_low_latency_mode=False, or the user's NVSHMEM_DISABLE_P2P) the remote
        # transport is the only way to reach peers: then it is left alone.
        env.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    # No multicast objects and no NVSHMEM collectives are used: skip NVLS set-up, and keep NVSHMEM
    # from loading NCCL (which refuses several ranks per GPU and may clash with torch's).
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    env.setdefault("NVSHMEM_DISABLE_NCCL", "1")
    if nvshmem_bool(env.get("NVSHMEM_IB_ENABLE_IBGDA")):
        env.setdefault("NVSHMEM_IBGDA_NUM_RC_PER_PE", str(ctx.num_qps_per_rank))
    # Reserve every buffer up front rather than rely on the heap growing later.
    needed = max(1, _symmetric_buffers(ctx)) * ctx.num_rdma_bytes + HEAP_HEADROOM
    if needed > DEFAULT_SYMMETRIC_HEAP:
        env.setdefault("NVSHMEM_SYMMETRIC_SIZE", str((needed + (2 << 20) - 1) // (2 << 20) * (2 << 20)))
    return {k: v for k, v in env.items() if k not in before}


@dataclass(frozen=True)
class Preflight:
    """What one rank brings to the agreement before NVSHMEM is initialised (all-gathered)."""

    rank: int
    num_ranks: int
    group_key: str              # global ranks of the group's members, "0,1,2,3"
    initialized: bool           # this process already holds NVSHMEM (another Buffer)
    nvshmem_version: str        # NVSHMEM headers _C was built against
    unique_id_bytes: int        # sizeof(nvshmemx_uniqueid_t) in that build
    host: str
    remote_transport_none: bool  # configure_environment set NVSHMEM_REMOTE_TRANSPORT=none here
    problem: Optional[str]      # what this rank's own checks found, or None


def _local_problems(ctx: BackendContext, C, device_index: Any, initialized: bool) -> List[str]:
    """This rank's checks of its own inputs, each one a thing NVSHMEM would not survive or report."""
    problems = []
    # A failed attempt leaves NVSHMEM half initialised in this process; the peers must not start a
    # bootstrap that this rank will never join.
    failure = C.nvshmem_init_failure()
    if failure:
        problems.append(f"ep_comm's NVSHMEM initialisation failed earlier in this process ({failure}); NVSHMEM "
                        "cannot be initialised again in this process: restart the processes (all ranks)")
    # NVSHMEM's bootstrap does not check its PE number against the PE count.
    if not (isinstance(ctx.rank, int) and isinstance(ctx.num_ranks, int) and 0 <= ctx.rank < ctx.num_ranks):
        problems.append(f"rank {ctx.rank} is not in [0, num_ranks={ctx.num_ranks})")
    # cudaSetDevice would raise on this rank only, while its peers wait in the bootstrap.
    num_devices = C.device_count()
    if isinstance(device_index, bool) or not isinstance(device_index, int) or not 0 <= device_index < num_devices:
        problems.append(f"device index {device_index!r} does not exist (this process sees {num_devices} CUDA devices; "
                        "check CUDA_VISIBLE_DEVICES and torch.cuda.set_device)")
    if not initialized:
        problems.extend(check_environment())
    return problems


def agreement_error(everyone: Sequence[Preflight]) -> Optional[str]:
    """The error every rank raises, or None when all may initialise. A function of the all-gathered
    records only, so every rank reaches the same verdict."""
    num_ranks = len(everyone)
    problems = [f"rank {r}: {p.problem}" for r, p in enumerate(everyone) if p.problem]
    if problems:
        return "NVSHMEM set-up refused on every rank: " + "; ".join(problems)
    # NVSHMEM numbers PEs by what each rank claims: two claims of one number, or PE counts that differ,
    # leave the bootstrap waiting for a PE that never comes.
    misnumbered = [f"rank {r} calls itself {p.rank} of {p.num_ranks}" for r, p in enumerate(everyone)
                   if p.rank != r or p.num_ranks != num_ranks]
    if misnumbered:
        return (f"NVSHMEM set-up refused on every rank: the group has {num_ranks} ranks, but "
                + "; ".join(misnumbered) + " (build the Buffer's context from the group it runs over)")
    keys = sorted({p.group_key for p in everyone})
    if len(keys) > 1:
        return ("NVSHMEM set-up refused on every rank: ranks disagree on the group's members: "
                + "; ".join(f"ranks {[r for r, p in enumerate(everyone) if p.group_key == k]} have [{k}]" for k in keys)
                + " (create the Buffer over the same group, with the same members in the same order, on every rank)")
    if len({p.initialized for p in everyone}) > 1:
        ready = [r for r, p in enumerate(everyone) if p.initialized]
        return (f"ranks {ready} already initialised NVSHMEM and the others did not: create and destroy NVSHMEM "
                "Buffers in the same order on every rank")
    if everyone[0].initialized:
        return None  # initialised everywhere already: each rank takes another reference (C++ checks it matches)
    versions = sorted({p.nvshmem_version for p in everyone})
    if len(versions) > 1:
        # NVSHMEM's unique-id bootstrap exit()s when its peers' versions differ.
        return ("NVSHMEM set-up refused on every rank: ranks run different NVSHMEM builds: "
                + "; ".join(f"ranks {[r for r, p in enumerate(everyone) if p.nvshmem_version == v]} have {v}"
                            for v in versions)
                + " (install the same ep_comm and nvidia-nvshmem wheels everywhere)")
    hosts = sorted({p.host for p in everyone})
    defaulted = [r for r, p in enumerate(everyone) if p.remote_transport_none]
    if defaulted and len(hosts) > 1:
        return (f"NVSHMEM set-up refused on every rank: ranks {defaulted} took the group for one node and set "
                f"NVSHMEM_REMOTE_TRANSPORT=none, but the ranks run on {len(hosts)} hosts ({', '.join(hosts)}), "
                "which could not reach each other; fix EP_COMM_RANKS_PER_NODE, or set NVSHMEM_REMOTE_TRANSPORT")
    return None


def unique_id_error(everyone: Sequence[Preflight], root: Tuple[Optional[bytes], Optional[str]]) -> Optional[str]:
    """The error every rank raises for rank 0's (unique id, or the error creating it), or None."""
    root_id, root_error = root
    if root_error is not None:
        return f"NVSHMEM set-up failed on rank 0, for every rank: {root_error}"
    # The id is copied as a fixed-size struct: another size means another NVSHMEM build, whose
    # bootstrap would read past it or exit() on the version mismatch.
    wrong = [r for r, p in enumerate(everyone) if root_id is None or len(root_id) != p.unique_id_bytes]
    if wrong:
        got = "no bytes" if root_id is None else f"{len(root_id)} bytes"
        return (f"NVSHMEM set-up refused on every rank: rank 0's unique id has {got}, but ranks {wrong} expect "
                f"{everyone[wrong[0]].unique_id_bytes} (the same NVSHMEM build must run on every rank)")
    return None


def outcome_error(outcomes: Sequence[Tuple[Optional[str], bool]]) -> Optional[str]:
    """The error every rank raises after C.nvshmem_acquire, from every rank's (error text or None,
    NVSHMEM up here); None when all succeeded."""
    failed = [(r, error) for r, (error, _) in enumerate(outcomes) if error is not None]
    if not failed:
        return None
    up = [r for r, (_, is_up) in enumerate(outcomes) if is_up]
    return (f"NVSHMEM initialisation failed on ranks {[r for r, _ in failed]} of {len(outcomes)}: "
            + "; ".join(f"rank {r}: {error}" for r, error in failed)
            + (f" (NVSHMEM came up on ranks {up})" if up and len(up) < len(outcomes) else ""))


def _all_gather(obj: Any, ctx: BackendContext) -> List[Any]:
    return agreement.all_gather_object(obj, ctx, "NVSHMEM setup")


def acquire(ctx: BackendContext, C, device_index: int) -> None:
    """Initialise NVSHMEM (rank 0's unique id, all-gathered over ctx.group) or take another reference.

    Collective over ctx.group: every rank returns, or every rank raises RuntimeError (the same
    message, naming the ranks at fault and what to do). The caller owns one reference and gives it
    back with `C.nvshmem_release()`.
    """
    defaults = configure_environment(ctx, C)
    initialized = C.nvshmem_reference_count() > 0
    # NVSHMEM numbers PEs once, at initialisation: a later Buffer may share it only over the same
    # group (same members, same order), which the key identifies.
    group_key = ",".join(str(r) for r in dist.get_process_group_ranks(ctx.group))
    mine = Preflight(rank=ctx.rank, num_ranks=ctx.num_ranks, group_key=group_key, initialized=initialized,
                     nvshmem_version=str(C.nvshmem_version()), unique_id_bytes=int(C.nvshmem_unique_id_bytes()),
                     host=socket.gethostname(),
                     remote_transport_none=defaults.get("NVSHMEM_REMOTE_TRANSPORT") == "none",
                     problem="; ".join(_local_problems(ctx, C, device_index, initialized)) or None)
    everyone = _all_gather(mine, ctx)
    error = agreement_error(everyone)
    root_id = b""
    if error is None and not initialized:
        # Only now, with every rank's checks passed: nvshmemx_get_uniqueid reads NVSHMEM's variables
        # (once per process, for good), so a refused set-up leaves NVSHMEM untouched on every rank.
        root: Tuple[Optional[bytes], Optional[str]] = (None, None)
        if ctx.rank == 0:
            try:
                root = (C.nvshmem_get_unique_id(), None)
            except RuntimeError as e:
                root = (None, f"creating the NVSHMEM unique id failed: {e} (set NVSHMEM_DEBUG=INFO; "
                              "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME picks its network interface)")
        root = _all_gather(root, ctx)[0]
        error = unique_id_error(everyone, root)
        root_id = root[0] or b""
    if error is not None:
        for name in defaults:  # nothing was initialised: the next attempt starts from the user's settings
            os.environ.pop(name, None)
        raise RuntimeError(error)

    error = None
    try:
        C.nvshmem_acquire(root_id, ctx.rank, ctx.num_ranks, device_index, group_key)
    except RuntimeError as e:
        error = str(e)
    outcomes = _all_gather((error, bool(C.nvshmem_initialised_here())), ctx)
    error = outcome_error(outcomes)
    if error is None:
        return
    if initialized:
        # Nothing was initialised: give back the references that were taken (none is the last).
        if outcomes[ctx.rank][0] is None:
            C.nvshmem_release()
    else:
        # nvshmem_finalize is collective: only when NVSHMEM came up on every rank may all finalise it
        # together. Otherwise it stays up, unused, where it came up. Either way this process may not
        # initialise NVSHMEM again (C++ records it).
        C.nvshmem_abandon(error, all(up for _, up in outcomes))
    raise RuntimeError(error)
