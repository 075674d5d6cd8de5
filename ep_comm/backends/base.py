"""The contract between Buffer and a backend.

Buffer validates every input, picks the stream, and then calls one backend method. A backend
runs on the *current* stream (Buffer has already switched to the communication stream where one
is used), allocates its outputs with torch, and never re-validates user input. Handles are owned
by Buffer's backend; `state` carries whatever that backend needs to reuse a layout.
"""
from __future__ import annotations

import atexit
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch

from ep_comm.config import Config


@dataclass
class BackendContext:
    """Everything a backend needs to set itself up; built once by Buffer."""

    group: Any                    # torch.distributed ProcessGroup: the control plane only
    rank: int
    num_ranks: int
    ranks_per_node: int           # NVLink domain size (EP_COMM_RANKS_PER_NODE overrides)
    device: torch.device          # cuda device of this rank, or cpu
    buffer_id: int                # stamps handles so a foreign handle is refused
    num_nvl_bytes: int
    num_rdma_bytes: int
    low_latency_mode: bool
    num_qps_per_rank: int
    allow_nvlink_for_low_latency_mode: bool
    allow_mnnvl: bool
    timeout_s: float              # device and host waits give up after this (EP_COMM_TIMEOUT_S)
    agreement: Any = None         # the Buffer's ep_comm.agreement.Agreement (names peers in timeouts)

    @property
    def num_nodes(self) -> int:
        return self.num_ranks // self.ranks_per_node


@dataclass(eq=False)
class DispatchHandle:
    """Layout of one normal-mode dispatch, reused by combine and by cached dispatch."""

    buffer_id: int
    backend: str
    num_tokens: int            # rows of x on this rank at dispatch time
    hidden: int
    num_recv_rows: int         # rows of recv_x (== num_worst_tokens when that was given)
    num_worst_tokens: int
    is_token_in_rank: torch.Tensor  # bool [num_tokens, num_ranks]
    state: Any = None          # backend-specific (counts, source indices, prefix matrices, ...)
    agreed_call: int = -1      # number of the agreed call that made it: its users must name the same one


@dataclass(eq=False)
class LowLatencyHandle:
    """Layout of one low-latency dispatch, consumed by low_latency_combine."""

    buffer_id: int
    backend: str
    num_tokens: int
    hidden: int
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    state: Any = None
    agreed_call: int = -1      # number of the agreed call that made it (see DispatchHandle)


@dataclass
class DispatchArgs:
    """Validated inputs of Buffer.dispatch (normal mode)."""

    x: torch.Tensor                          # bf16 [N, H] or float8_e4m3fn [N, H]
    x_scales: Optional[torch.Tensor]         # float32 [N, H/128] when x is FP8, else None
    topk_idx: Optional[torch.Tensor]         # int64 [N, K]; None in cached mode
    topk_weights: Optional[torch.Tensor]     # float32 [N, K] or None
    num_tokens_per_rank: Optional[torch.Tensor]      # int32 [R]; None in cached mode
    num_tokens_per_rdma_rank: Optional[torch.Tensor]  # int32 [nodes] or None
    is_token_in_rank: torch.Tensor           # bool [N, R] (from the handle in cached mode)
    num_tokens_per_expert: Optional[torch.Tensor]    # int32 [E]; None in cached mode
    handle: Optional[DispatchHandle]         # given => cached mode
    expert_alignment: int
    num_worst_tokens: int
    config: Config


@dataclass
class DispatchOutput:
    recv_x: torch.Tensor
    recv_x_scales: Optional[torch.Tensor]
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    num_recv_tokens_per_expert_list: Optional[List[int]]
    handle: DispatchHandle


@dataclass
class LowLatencyDispatchArgs:
    x: torch.Tensor                          # bf16 [N, H]
    topk_idx: torch.Tensor                   # int64 [N, K]
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    cumulative_local_expert_recv_stats: Optional[torch.Tensor]  # int32 [E_local] or None
    use_fp8: bool
    round_scale: bool
    use_ue8m0: bool
    return_recv_hook: bool


@dataclass
class LowLatencyDispatchOutput:
    recv_x: torch.Tensor                     # bf16 / fp8 [E_local, R*T, H]
    recv_x_scales: Optional[torch.Tensor]    # column-major view [E_local, R*T, H/128] (f32) or [.., H/512] (int32, UE8M0)
    recv_count: torch.Tensor                 # int32 [E_local]
    handle: LowLatencyHandle
    hook: Optional[Callable[[], None]]       # set when return_recv_hook: launches the receive half


@dataclass
class LowLatencyCombineArgs:
    x: torch.Tensor                          # bf16 [E_local, R*T, H]
    topk_idx: torch.Tensor                   # int64 [N, K]
    topk_weights: torch.Tensor               # float32 [N, K]
    handle: LowLatencyHandle
    zero_copy: bool
    return_recv_hook: bool
    out: Optional[torch.Tensor]              # bf16 [N, H] to write into, or None


class Backend:
    """Base class; see the module docstring for the rules every backend follows."""

    name = "base"
    # True where destroy() must run on all ranks together (NVSHMEM frees are collective): such a
    # backend is destroyed only by an explicit Buffer.destroy() or, bounded, at exit; never by GC.
    collective_destroy = False

    def _state_of(self, handle: DispatchHandle):
        """The kernel state a handle of this backend carries; ValueError for another backend's handle."""
        if handle.backend != self.name:
            raise ValueError(f"this handle was made by the {handle.backend} backend, not {self.name}")
        return handle.state

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        """-> (num_tokens_per_rank int32[R], num_tokens_per_rdma_rank int32[nodes] | None,
        num_tokens_per_expert int32[E], is_token_in_rank bool[N, R])"""
        raise NotImplementedError

    def dispatch(self, args: DispatchArgs) -> DispatchOutput:
        raise NotImplementedError

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor],
                bias: List[torch.Tensor], config: Config):
        """-> (combined_x [N, H] like x, combined_topk_weights float32 [N, K] | None)"""
        raise NotImplementedError

    def low_latency_dispatch(self, args: LowLatencyDispatchArgs) -> LowLatencyDispatchOutput:
        raise NotImplementedError

    def low_latency_combine(self, args: LowLatencyCombineArgs):
        """-> (combined_x bf16 [N, H], hook or None)"""
        raise NotImplementedError

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        raise NotImplementedError

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        raise NotImplementedError

    def check_errors(self) -> None:
        """Raise RuntimeError for the first error a kernel recorded (timeouts name rank, phase, peer).
        Reads host-mapped memory without synchronising."""

    def destroy(self) -> None:
        pass


def destroy_at_exit(backend: Backend, timeout_s: float) -> None:
    """Destroy `backend` at interpreter exit, if it still lives, giving up after `timeout_s`.

    Teardown of NVSHMEM buffers is collective: a peer that already exited (or crashed) would leave
    it waiting forever. At exit the process is going away anyway, so a teardown that does not finish
    in time is abandoned (its daemon thread dies with the process) instead of hanging the exit.
    """
    ref = weakref.ref(backend)

    def run() -> None:
        target = ref()
        if target is None:
            return
        worker = threading.Thread(target=_destroy_quietly, args=(target,), daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            print(f"ep_comm: {type(target).__name__} teardown at exit did not finish in {timeout_s:.0f} s "
                  "(a peer may have exited first); exiting without it", file=sys.stderr)

    atexit.register(run)


def _destroy_quietly(backend: Backend) -> None:
    try:
        backend.destroy()
    except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
        pass
