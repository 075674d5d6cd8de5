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
from ep_comm import autograd as _autograd
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
    """What Buffer.dispatch returns, by name. FP8 comes back as recv_x (payload) and recv_x_scales,
    as in LowLatencyDispatchResult; recv_x_buffer_form is Buffer's (payload, scales) pair. A cached
    dispatch fills recv_x (and recv_x_scales) only, and hands its handle back."""
    recv_x: torch.Tensor                 # bf16 [M, H], or float8_e4m3fn [M, H] for FP8 input
    recv_x_scales: Optional[torch.Tensor]  # float32 [M, H/128] for FP8 input, else None
    recv_topk_idx: Optional[torch.Tensor]  # int64 [M, K]: local expert ids, -1 for experts elsewhere
    recv_topk_weights: Optional[torch.Tensor]  # float32 [M, K], 0 where the id is -1
    num_recv_tokens_per_expert_list: Optional[List[int]]  # per local expert, rounded up to expert_alignment
    handle: DispatchHandle
    event: EventOverlap

    @property
    def recv_x_buffer_form(self) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """recv_x as Buffer.dispatch returns it: the tensor, or (payload, scales) for FP8."""
        return self.recv_x if self.recv_x_scales is None else (self.recv_x, self.recv_x_scales)

    @property
    def num_recv_tokens_per_expert(self) -> Optional[List[int]]:
        """Former name of num_recv_tokens_per_expert_list."""
        return self.num_recv_tokens_per_expert_list


@dataclass
class CombineResult:
    combined_x: torch.Tensor             # bf16 [N, H]
    combined_topk_weights: Optional[torch.Tensor]  # float32 [N, K]
    event: EventOverlap


@dataclass
class LowLatencyDispatchResult:
    """What Buffer.low_latency_dispatch returns, by name; FP8 (the default, use_fp8=True) as recv_x
    and recv_x_scales, like DispatchResult."""
    recv_x: torch.Tensor                 # float8_e4m3fn (use_fp8, the default) or bf16 [E_local, R*T, H]
    recv_x_scales: Optional[torch.Tensor]  # FP8 scales (column-major view) or None for bf16
    recv_count: torch.Tensor             # int32 [E_local]
    handle: LowLatencyHandle
    event: EventOverlap
    hook: Optional[Callable[[], None]]

    @property
    def recv_x_buffer_form(self) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """recv_x as Buffer.low_latency_dispatch returns it: the tensor, or (payload, scales) for FP8."""
        return self.recv_x if self.recv_x_scales is None else (self.recv_x, self.recv_x_scales)


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


def dispatch(x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], topk_idx: Optional[torch.Tensor] = None,
             topk_weights: Optional[torch.Tensor] = None, *, num_experts: Optional[int] = None,
             handle: Optional[DispatchHandle] = None, group: Optional[dist.ProcessGroup] = None,
             expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
             async_finish: bool = False) -> DispatchResult:
    """Normal-mode dispatch with the layout computed for you. See Buffer.dispatch for shapes.

    x: bf16 [N, H] or (float8_e4m3fn [N, H], float32 [N, H/128]); topk_idx: int64 [N, K] (-1: no
    expert); topk_weights: float32 [N, K] or None; num_experts: required unless `handle` is given.

    Cached dispatch: `dispatch(x, handle=earlier.handle)` sends x (same N) along an earlier
    dispatch's layout, without topk_idx/topk_weights; the result has recv_x (and recv_x_scales)
    only, and the same handle.

    Autograd: when x or topk_weights requires grad (and grad mode is on), recv_x and
    recv_topk_weights are differentiable; backward is a combine of their gradients with this
    handle (ep_comm/autograd.py). It is collective: every rank must run backward through it. FP8 x
    carries no gradient.
    """
    wants_grad = _wants_grad(x, topk_weights)
    # Which inputs want gradients decides the backward's calls, so ranks must agree on it.
    grads = [_wants_grad(x), _wants_grad(topk_weights)] if wants_grad else None
    if handle is not None:
        buffer = _agree_cached_dispatch(x, topk_idx, topk_weights, num_experts, handle, group, grads)

        def run() -> DispatchResult:
            recv_x, _, _, _, _, event = buffer.dispatch(x, handle=handle, config=config, async_finish=async_finish)
            payload, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
            return DispatchResult(payload, scales, None, None, None, handle, event)
    else:
        group = group if group is not None else dist.group.WORLD
        num_ranks = dist.get_world_size(group)

        def check() -> Tuple[int, int]:
            # What the Buffer's size and the layout depend on: checked, then agreed, before either is made.
            payload, _ = v.split_x(x)
            if num_experts is None:
                raise ValueError("num_experts is required (only a cached dispatch, with handle=, goes without)")
            v.check_num_experts(num_experts, num_ranks)
            v.check_topk_idx(topk_idx, num_experts, payload.shape[0])
            _check_differentiable(x)
            hidden_bytes = payload.shape[-1] * max(payload.element_size(), 2)
            configs = (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks))
            return (max(c.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) for c in configs),
                    max(c.get_rdma_buffer_size_hint(hidden_bytes, num_ranks) for c in configs))  # rdma: 0 in one node

        sizes = _agree_plain(group, "ep_comm.dispatch", check, lambda: _x_fields(x) + [
            ("topk", topk_idx.shape[1]), ("topk_weights", topk_weights is not None), ("num_experts", num_experts),
            ("autograd", grads), ("buffer", _buffer_state(group, False))])
        buffer = get_buffer(group, num_nvl_bytes=sizes[0], num_rdma_bytes=sizes[1])

        def run() -> DispatchResult:
            num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, _ = \
                buffer._run_layout(topk_idx, num_experts, None, False, False)
            recv_x, recv_topk_idx, recv_topk_weights, counts, new_handle, event = buffer.dispatch(
                x, num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx,
                topk_weights=topk_weights, expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
                config=config, async_finish=async_finish)
            payload, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
            return DispatchResult(payload, scales, recv_topk_idx, recv_topk_weights, counts, new_handle, event)

    if not wants_grad:
        return run()
    payload = x[0] if isinstance(x, (tuple, list)) else x
    return _autograd.dispatch(buffer, payload, topk_weights, run)


def _wants_grad(*tensors) -> bool:
    """Whether autograd must record a call: grad mode on and some input (FP8 pairs looked into) requires grad."""
    flat = [t for item in tensors for t in (item if isinstance(item, (tuple, list)) else (item,))]
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in flat)


def _check_differentiable(x) -> None:
    if isinstance(x, (tuple, list)) and _wants_grad(x):
        raise TypeError("an FP8 x (float8_e4m3fn payload, float32 scales) carries no gradient, but one of them "
                        "requires grad; dispatch the bf16 x to differentiate through dispatch")


def _agree_cached_dispatch(x, topk_idx, topk_weights, num_experts, handle, group, grads) -> Buffer:
    """Check and agree a plain cached dispatch; returns the Buffer that made `handle`."""
    known = _buffers_by_id.get(getattr(handle, "buffer_id", None))
    if group is None:
        group = known.group if known is not None else dist.group.WORLD

    def check() -> Buffer:
        buffer = _buffer_of(handle)
        if buffer.group is not group:
            raise ValueError("this handle was made by a dispatch over another process group than `group`")
        if topk_idx is not None or topk_weights is not None or num_experts is not None:
            raise ValueError("a cached dispatch (handle given) takes no topk_idx, topk_weights or num_experts: "
                             "the layout comes from the handle")
        v.split_x(x)
        _check_differentiable(x)
        return buffer

    return _agree_plain(group, "ep_comm.dispatch (cached)", check, lambda: _x_fields(x) + [
        ("handle_of_call", handle.agreed_call), ("autograd", grads)])


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
    """Unweighted sum over destination ranks back into token order. See Buffer.combine.

    x: bf16 [M, H], the rows of `handle`'s dispatch; topk_weights: float32 [M, K] or None, summed
    the same way into combined_topk_weights; bias: bf16 [N, H] or a pair of them, added once per token.

    Autograd: when x, topk_weights or a bias requires grad (and grad mode is on), the results are
    differentiable; backward is a cached dispatch of the gradient along `handle`
    (ep_comm/autograd.py), a collective call every rank must make.
    """
    buffer = _buffer_of(handle)

    def run():
        return buffer.combine(x, handle, topk_weights=topk_weights, bias=bias, config=config,
                              async_finish=async_finish)

    biases = list(bias) if isinstance(bias, (tuple, list)) else [bias]
    if _wants_grad(x, topk_weights, biases):
        combined_x, combined_weights, event = _autograd.combine(buffer, handle, x, topk_weights, biases, run)
    else:
        combined_x, combined_weights, event = run()
    return CombineResult(combined_x, combined_weights, event)


def low_latency_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                         num_experts: int, *, group: Optional[dist.ProcessGroup] = None,
                         cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                         round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                         return_recv_hook: bool = False) -> LowLatencyDispatchResult:
    """Low-latency dispatch into the packed per-expert layout. See Buffer.low_latency_dispatch.

    recv_x is FP8 (float8_e4m3fn, with recv_x_scales) unless use_fp8=False. For inference: no
    gradients are recorded (inputs that require grad are read as data)."""
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
    """Weighted top-k reduction of expert outputs (normal-mode combine is unweighted). See
    Buffer.low_latency_combine. Records no gradients, like low_latency_dispatch."""
    combined_x, event, hook = _buffer_of(handle).low_latency_combine(
        x, topk_idx, topk_weights, handle, zero_copy=zero_copy, async_finish=async_finish,
        return_recv_hook=return_recv_hook, out=out)
    return LowLatencyCombineResult(combined_x, event, hook)
