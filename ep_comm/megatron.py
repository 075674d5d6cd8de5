"""Megatron-LM's flex-dispatcher entry points (megatron/core/transformer/moe/fused_a2a.py) on ep_comm.

token_dispatcher.py imports its fused all-to-all from fused_a2a; importing the same names from here
instead runs Megatron's DeepEP path (`moe_flex_dispatcher_backend="deepep"`) on ep_comm:

    from ep_comm.megatron import (HYBRIDEP_TOKEN_ALIGNMENT, alloc_ep_symm_buffer, ensure_nccl_ep_bootstrapped,
                                  fused_combine, fused_dispatch, hybrid_ep_combine, hybrid_ep_dispatch, ...)

`fused_dispatch`/`fused_combine` are autograd functions with fused_a2a's arguments and returns: the
backward of dispatch is a combine of the gradient with the dispatch handle (the top-k probabilities'
gradient rides along as combine's topk_weights), the backward of combine is a cached dispatch with
the handle. The HybridEP and NCCL-EP backends of fused_a2a are not provided: their names exist (None,
or functions that raise) so the import line stays unchanged, as in a Megatron without those packages.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ep_comm.buffer import Buffer
from ep_comm.event import EventOverlap

HAVE_DEEP_EP = True
HAVE_HYBRIDEP = False
HAVE_TE_EP = False
HYBRIDEP_TOKEN_ALIGNMENT = 64

# Megatron keeps one Buffer for the flex dispatcher, regrown when a larger hidden size arrives.
_buffer: Optional[Buffer] = None


def get_hidden_bytes(x: torch.Tensor) -> int:
    """Bytes of one row as the buffers are sized: hidden * max(element size, 2)."""
    return x.size(1) * max(x.element_size(), 2)


def get_buffer(group: dist.ProcessGroup, hidden_bytes: int) -> Buffer:
    """The shared Buffer for `group`, made (collectively) when absent, for another group, or too small."""
    global _buffer
    num_nvl_bytes, num_rdma_bytes = 0, 0
    num_ranks = dist.get_world_size(group)
    for config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)):
        num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks), num_nvl_bytes)
        num_rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks), num_rdma_bytes)
    if (_buffer is None or _buffer.group != group or _buffer.num_nvl_bytes < num_nvl_bytes
            or _buffer.num_rdma_bytes < num_rdma_bytes):
        _buffer = Buffer(group, num_nvl_bytes, num_rdma_bytes)
    return _buffer


def reset_buffer() -> None:
    """Destroy the shared Buffer (all ranks together) so the next call makes a new one."""
    global _buffer
    if _buffer is not None:
        _buffer.destroy()
    _buffer = None


def _stream_event(async_finish: bool) -> Optional[EventOverlap]:
    """What Megatron passes as previous_event: with async_finish, an event on the current stream."""
    return Buffer.capture() if async_finish else None


def _keep_for_backward(ctx, group, handle, after, async_finish: bool, allocate_on_comm_stream: bool) -> None:
    """Wait for an async forward on the current stream (as Megatron's callers expect), and keep what
    backward's call along the same handle needs."""
    if async_finish:
        after.current_stream_wait()
    ctx.group, ctx.handle = group, handle
    ctx.async_finish, ctx.allocate_on_comm_stream = async_finish, allocate_on_comm_stream


class FusedDispatch(torch.autograd.Function):
    """Layout + dispatch in forward; combine of the gradients with the handle in backward."""

    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group, async_finish=False,
                allocate_on_comm_stream=False):
        buffer = get_buffer(group, get_hidden_bytes(x))
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
            buffer.get_dispatch_layout(token_indices, num_experts, previous_event=_stream_event(async_finish),
                                       async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        recv_x, recv_token_indices, recv_token_probs, num_recv_tokens_per_expert_list, handle, after = \
            buffer.dispatch(x, topk_idx=token_indices, topk_weights=token_probs,
                            num_tokens_per_rank=num_tokens_per_rank, num_tokens_per_rdma_rank=num_tokens_per_rdma_rank,
                            is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert,
                            previous_event=event, async_finish=async_finish,
                            allocate_on_comm_stream=allocate_on_comm_stream)
        _keep_for_backward(ctx, group, handle, after, async_finish, allocate_on_comm_stream)
        tokens_per_expert = torch.tensor(num_recv_tokens_per_expert_list)
        return recv_x, recv_token_indices, recv_token_probs, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_output, grad_token_indices, grad_token_probs, grad_tokens_per_expert, grad_handle):
        buffer = get_buffer(ctx.group, get_hidden_bytes(grad_output))
        grad_x, grad_token_probs, after = buffer.combine(
            grad_output.contiguous(), ctx.handle,
            topk_weights=None if grad_token_probs is None else grad_token_probs.float(),
            previous_event=_stream_event(ctx.async_finish), async_finish=ctx.async_finish,
            allocate_on_comm_stream=ctx.allocate_on_comm_stream)
        if ctx.async_finish:
            after.current_stream_wait()
        return grad_x, None, grad_token_probs, None, None, None, None


class FusedCombine(torch.autograd.Function):
    """Combine in forward; cached dispatch of the gradient with the handle in backward."""

    @staticmethod
    def forward(ctx, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        buffer = get_buffer(group, get_hidden_bytes(x))
        combined_x, _, after = buffer.combine(x, handle=handle, previous_event=_stream_event(async_finish),
                                              async_finish=async_finish,
                                              allocate_on_comm_stream=allocate_on_comm_stream)
        _keep_for_backward(ctx, group, handle, after, async_finish, allocate_on_comm_stream)
        return combined_x, None

    @staticmethod
    def backward(ctx, grad_output, grad_none=None):
        buffer = get_buffer(ctx.group, get_hidden_bytes(grad_output))
        grad_x, _, _, _, _, after = buffer.dispatch(
            grad_output.contiguous(), handle=ctx.handle, previous_event=_stream_event(ctx.async_finish),
            async_finish=ctx.async_finish, allocate_on_comm_stream=ctx.allocate_on_comm_stream)
        if ctx.async_finish:
            after.current_stream_wait()
        return grad_x, None, None, None, None


def fused_dispatch(x: torch.Tensor, token_indices: torch.Tensor, token_probs: torch.Tensor, num_experts: int,
                   group: dist.ProcessGroup, async_finish: bool = False, allocate_on_comm_stream: bool = False):
    """Send each token to the ranks of its experts (differentiable in x and token_probs).

    x: bf16 [N, H]; token_indices: int64 [N, K] (-1 = dropped); token_probs: float32 [N, K].
    Returns (recv_x bf16 [M, H], recv_token_indices int64 [M, K] (local expert ids, -1 elsewhere),
    recv_token_probs float32 [M, K], tokens_per_expert int64 [E_local] (CPU), handle).
    """
    return FusedDispatch.apply(x.contiguous(), token_indices, token_probs, num_experts, group, async_finish,
                               allocate_on_comm_stream)


def fused_combine(x: torch.Tensor, group: dist.ProcessGroup, handle, async_finish: bool = False,
                  allocate_on_comm_stream: bool = False) -> Tuple[torch.Tensor, None]:
    """Sum each token's rows back from the ranks it went to (unweighted; differentiable in x).

    x: bf16 [M, H] in dispatch's row order. Returns (combined bf16 [N, H], None)."""
    return FusedCombine.apply(x, group, handle, async_finish, allocate_on_comm_stream)


def set_deepep_num_sms(num_sms: int) -> None:
    """SMs the normal-mode kernels may use (Megatron's moe_flex_dispatcher_num_sms)."""
    Buffer.set_num_sms(num_sms)


# ---- the other backends of fused_a2a: absent here, as in a Megatron without their packages -------
hybrid_ep_dispatch = None
hybrid_ep_combine = None
alloc_ep_symm_buffer = None
new_nccl_ep_buffer = None
nccl_ep_dispatch = None
nccl_ep_combine = None


def init_hybrid_ep_buffer(*args, **kwargs) -> None:
    raise NotImplementedError("ep_comm does not provide the HybridEP backend; use moe_flex_dispatcher_backend='deepep'")


def reset_hybrid_ep_buffer() -> None:
    """Nothing to reset: no HybridEP buffer exists here."""


def ensure_nccl_ep_bootstrapped(*args, **kwargs) -> None:
    raise RuntimeError("ep_comm does not provide the NCCL-EP backend; use moe_flex_dispatcher_backend='deepep'")


def is_nccl_ep_bootstrapped() -> bool:
    return False


def nccl_ep_finalize() -> None:
    """Nothing to tear down: no NCCL-EP context exists here."""
