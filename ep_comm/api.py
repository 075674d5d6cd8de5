"""Plain functions for callers who don't want DeepEP's tuple protocol.

Each process group gets one cached Buffer per mode, sized for the largest call seen so far
(a larger call replaces it; a destroyed one is replaced at the next call). Every dispatch is agreed
by all ranks before any Buffer is sized or made (ep_comm/agreement.py), so a rank with other shapes
or a bad input gets the real cause, on every rank, instead of a Buffer-size mismatch. The plain
API's calls and all Buffers share one call sequence per group. Results are named dataclasses.
Handles remember their Buffer, so combine needs no group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ep_comm import agreement
from ep_comm import validation as v
from ep_comm.backends.base import DispatchHandle, LowLatencyHandle
from ep_comm.buffer import Buffer, _x_fields
from ep_comm.config import Config
from ep_comm.event import EventOverlap

_buffers: Dict[Tuple[int, bool], Buffer] = {}   # (id(group), low_latency) -> Buffer
_buffers_by_id: Dict[int, Buffer] = {}
_low_latency_sizes: Dict[int, Tuple[int, int, int]] = {}  # buffer id -> (T, H, E) of its last dispatch

def _buffer_state(group, low_latency: bool) -> str:
    """'none', 'live' or 'destroyed': part of what ranks agree on, since it decides who makes a Buffer."""
    buffer = _buffers.get((id(group), low_latency))
    return "none" if buffer is None else ("destroyed" if buffer._destroyed else "live")


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
    if buffer is not None and buffer._destroyed:
        # Destroyed by its user (on every rank, as destroy() asks): the next call makes a new one.
        _buffers.pop(key)
        _buffers_by_id.pop(buffer._id, None)
        buffer = None
    if buffer is not None and buffer.num_nvl_bytes >= num_nvl_bytes and buffer.num_rdma_bytes >= num_rdma_bytes:
        return buffer
    if buffer is not None:
        num_nvl_bytes = max(num_nvl_bytes, buffer.num_nvl_bytes)
        num_rdma_bytes = max(num_rdma_bytes, buffer.num_rdma_bytes)
        _buffers.pop(key)
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
    group = group if group is not None else dist.group.WORLD
    num_ranks = dist.get_world_size(group)

    def check() -> Tuple[int, int]:
        # What the Buffer's size and the layout depend on: checked, then agreed, before either is made.
        payload, _ = v.split_x(x)
        v.check_num_experts(num_experts, num_ranks)
        v.check_topk_idx(topk_idx, num_experts, payload.shape[0])
        hidden_bytes = payload.shape[-1] * max(payload.element_size(), 2)
        configs = (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks))
        return (max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in configs),
                max(c.get_rdma_buffer_size_hint(hidden_bytes, num_ranks) for c in configs))  # rdma: 0 in one node

    sizes = _agree_plain(group, "ep_comm.dispatch", check, lambda: _x_fields(x) + [
        ("topk", topk_idx.shape[1]), ("topk_weights", topk_weights is not None), ("num_experts", num_experts),
        ("buffer", _buffer_state(group, False))])
    buffer = get_buffer(group, num_nvl_bytes=sizes[0], num_rdma_bytes=sizes[1])
    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
        buffer._run_layout(topk_idx, num_experts, None, False, False)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
        topk_weights=topk_weights, expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
        config=config, async_finish=async_finish)
    return DispatchResult(recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event)


def _agree_plain(group, kind: str, check: Callable, fields: Callable):
    """Check this rank's inputs and agree on the call with every rank of `group` (see agreement.py):
    sizes and Buffers are decided only by calls that match everywhere. Returns check()'s result."""
    error = None
    result = None
    sig: list = []
    try:
        result = check()
        sig = fields()
    except (TypeError, ValueError) as e:
        error = e
    agreement.for_group(group).agree(kind, sig, error, agreement.timeout_s())
    if error is not None:
        raise error
    return result


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
    num_ranks = dist.get_world_size(group)

    def check() -> int:
        v.check_tensor("x", x, torch.bfloat16, ndim=2)
        v.check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        v.check_num_experts(num_experts, num_ranks)
        return Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, x.shape[-1], num_ranks,
                                                     num_experts)

    num_rdma_bytes = _agree_plain(group, "ep_comm.low_latency_dispatch", check, lambda: [
        ("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank), ("hidden", x.shape[-1]),
        ("num_experts", num_experts), ("buffer", _buffer_state(group, True))])
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
