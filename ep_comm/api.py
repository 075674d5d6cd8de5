"""Plain functions for callers who don't want DeepEP's tuple protocol.

Each process group gets one cached Buffer per mode, sized for the largest call seen so far
(a larger call replaces it; every rank makes the same decision because the sizes are global).
Results are named dataclasses. Handles remember their Buffer, so combine needs no group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ep_comm.backends.base import DispatchHandle, LowLatencyHandle
from ep_comm.buffer import Buffer
from ep_comm.config import Config
from ep_comm.event import EventOverlap

_buffers: Dict[Tuple[int, bool], Buffer] = {}   # (id(group), low_latency) -> Buffer
_buffers_by_id: Dict[int, Buffer] = {}
_low_latency_sizes: Dict[int, Tuple[int, int, int]] = {}  # buffer id -> (T, H, E) of its last dispatch


@dataclass
class DispatchResult:
    recv_x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]  # bf16 [M, H] or (fp8 [M, H], f32 [M, H/128])
    recv_topk_idx: torch.Tensor          # int64 [M, K]: local expert ids, -1 for experts elsewhere
    recv_topk_weights: Optional[torch.Tensor]  # float32 [M, K], 0 where the id is -1
    num_recv_tokens_per_expert: List[int]  # per local expert, rounded up to expert_alignment
    handle: DispatchHandle
    event: EventOverlap


@dataclass
class CombineResult:
    combined_x: torch.Tensor             # bf16 [N, H]
    combined_topk_weights: Optional[torch.Tensor]  # float32 [N, K]
    event: EventOverlap


@dataclass
class LowLatencyDispatchResult:
    recv_x: torch.Tensor                 # bf16 or float8_e4m3fn [E_local, R*T, H]
    recv_x_scales: Optional[torch.Tensor]  # FP8 scales (column-major view) or None for bf16
    recv_count: torch.Tensor             # int32 [E_local]
    handle: LowLatencyHandle
    event: EventOverlap
    hook: Optional[Callable[[], None]]


@dataclass
class LowLatencyCombineResult:
    combined_x: torch.Tensor             # bf16 [N, H]
    event: EventOverlap
    hook: Optional[Callable[[], None]]


def get_buffer(group: Optional[dist.ProcessGroup] = None, *, low_latency: bool = False, num_nvl_bytes: int = 0,
               num_rdma_bytes: int = 0) -> Buffer:
    """The cached Buffer of `group` for one mode, replaced by a larger one when the sizes grow."""
    group = group if group is not None else dist.group.WORLD
    key = (id(group), low_latency)
    buffer = _buffers.get(key)
    if buffer is not None and buffer.num_nvl_bytes >= num_nvl_bytes and buffer.num_rdma_bytes >= num_rdma_bytes:
        return buffer
    if buffer is not None:
        num_nvl_bytes = max(num_nvl_bytes, buffer.num_nvl_bytes)
        num_rdma_bytes = max(num_rdma_bytes, buffer.num_rdma_bytes)
        _buffers_by_id.pop(buffer._id, None)
        buffer.destroy()
    buffer = Buffer(group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes, low_latency_mode=low_latency)
    _buffers[key] = buffer
    _buffers_by_id[buffer._id] = buffer
    return buffer


def _buffer_of(handle) -> Buffer:
    buffer = _buffers_by_id.get(getattr(handle, "buffer_id", None))
    if buffer is None:
        raise ValueError("this handle was not made by ep_comm.dispatch/low_latency_dispatch, or its buffer was "
                         "replaced by a larger one since; dispatch again")
    return buffer


def dispatch(x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], topk_idx: torch.Tensor,
             topk_weights: Optional[torch.Tensor] = None, *, num_experts: int,
             group: Optional[dist.ProcessGroup] = None, expert_alignment: int = 1, num_worst_tokens: int = 0,
             config: Optional[Config] = None, async_finish: bool = False) -> DispatchResult:
    """Normal-mode dispatch with the layout computed for you. See Buffer.dispatch for shapes."""
    payload = x[0] if isinstance(x, (tuple, list)) else x
    group = group if group is not None else dist.group.WORLD
    num_ranks = dist.get_world_size(group)
    hidden_bytes = payload.shape[-1] * max(payload.element_size(), 2) if isinstance(payload, torch.Tensor) else 0
    configs = (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks))
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)
    num_rdma_bytes = max(c.get_rdma_buffer_size_hint(hidden_bytes, num_ranks) for c in configs)  # 0 in one node
    buffer = get_buffer(group, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes)
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
        topk_weights=topk_weights, expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
        config=config, async_finish=async_finish)
    return DispatchResult(recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event)


def combine(x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
            bias=None, *, config: Optional[Config] = None, async_finish: bool = False) -> CombineResult:
    """Unweighted sum over destination ranks back into token order. See Buffer.combine."""
    combined_x, combined_weights, event = _buffer_of(handle).combine(
        x, handle, topk_weights=topk_weights, bias=bias, config=config, async_finish=async_finish)
    return CombineResult(combined_x, combined_weights, event)


def low_latency_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                         num_experts: int, *, group: Optional[dist.ProcessGroup] = None,
                         cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                         round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                         return_recv_hook: bool = False) -> LowLatencyDispatchResult:
    """Low-latency dispatch into the packed per-expert layout. See Buffer.low_latency_dispatch."""
    group = group if group is not None else dist.group.WORLD
    num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, x.shape[-1],
                                                           dist.get_world_size(group), num_experts)
    buffer = get_buffer(group, low_latency=True, num_rdma_bytes=num_rdma_bytes)
    # Low-latency buffers are laid out for one (T, H, E); new sizes need a collective clean first,
    # which every rank does here at the same call because the sizes are the same everywhere.
    sizes = (num_max_dispatch_tokens_per_rank, x.shape[-1], num_experts)
    if _low_latency_sizes.get(buffer._id, sizes) != sizes:
        buffer.clean_low_latency_buffer(*sizes)
    _low_latency_sizes[buffer._id] = sizes
    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
        cumulative_local_expert_recv_stats=cumulative_local_expert_recv_stats, use_fp8=use_fp8,
        round_scale=round_scale, use_ue8m0=use_ue8m0, async_finish=async_finish, return_recv_hook=return_recv_hook)
    payload, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
    return LowLatencyDispatchResult(payload, scales, recv_count, handle, event, hook)


def low_latency_combine(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        handle: LowLatencyHandle, *, zero_copy: bool = False, async_finish: bool = False,
                        return_recv_hook: bool = False, out: Optional[torch.Tensor] = None) -> LowLatencyCombineResult:
    """Weighted top-k reduction of expert outputs. See Buffer.low_latency_combine."""
    combined_x, event, hook = _buffer_of(handle).low_latency_combine(
        x, topk_idx, topk_weights, handle, zero_copy=zero_copy, async_finish=async_finish,
        return_recv_hook=return_recv_hook, out=out)
    return LowLatencyCombineResult(combined_x, event, hook)
