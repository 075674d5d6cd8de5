"""Autograd for the plain normal-mode functions: dispatch and combine are each other's backward.

dispatch copies token t of x to every rank that holds one of its experts; combine sums each
token's rows back (unweighted, plus bias). So the gradient of dispatch is a combine of the incoming
gradients with the same handle, and the gradient of combine is a cached dispatch of its gradient
(the pairing Megatron-LM's fused all-to-all uses). Both backwards are collective calls on the
Buffer that ran the forward: every rank of the group must run backward through the same calls, in
the same order, a rank with no tokens too. Gradients are bf16 like the data; top-k weight
gradients are float32. Backwards call the Buffer synchronously, on the stream autograd runs them
on, so they need no event from the forward.

The api module calls in here only when a gradient is wanted, so no-grad calls are unchanged.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ep_comm.backends.base import DispatchHandle
from ep_comm.buffer import Buffer
from ep_comm.validation import VECTOR_BYTES


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Gradients may arrive expanded, strided or as views at odd offsets; Buffer refuses those."""
    t = t.contiguous()
    return t.clone() if t.numel() and t.data_ptr() % VECTOR_BYTES else t


def _live(buffer: Buffer) -> Buffer:
    if buffer._destroyed:
        raise RuntimeError("backward through ep_comm.dispatch/combine needs the Buffer that ran the forward, but it "
                           "was destroyed (or replaced by a larger one) before backward")
    return buffer


class _Dispatch(torch.autograd.Function):
    """recv_x[row] = x[token(row)]; recv_topk_weights[row, k] = topk_weights[token(row), k] where slot
    k names an expert of the receiving rank, else 0. Backward: combine of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, topk_weights: Optional[torch.Tensor], buffer: Buffer, run: Callable,
                results: list):
        result = run()
        results.append(result)
        ctx.buffer, ctx.handle, ctx.device = buffer, result.handle, x.device
        # Cached dispatch has no top-k outputs; the slots a rank received are those with a local id.
        ctx.recv_slots = None if result.recv_topk_idx is None else result.recv_topk_idx >= 0
        # Outputs of inputs that need no gradient (FP8 never does) are data.
        if result.recv_x_scales is not None or not x.requires_grad:
            ctx.mark_non_differentiable(result.recv_x)
        if result.recv_topk_weights is not None and not topk_weights.requires_grad:
            ctx.mark_non_differentiable(result.recv_topk_weights)
        return result.recv_x, result.recv_topk_weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_recv_x: Optional[torch.Tensor], grad_recv_topk_weights: Optional[torch.Tensor]):
        buffer, handle = _live(ctx.buffer), ctx.handle
        want_x, want_weights = ctx.needs_input_grad[:2]
        if not want_x:
            # Only the weights need their combine: the narrowest rows the kernels move (one 16-byte vector).
            grad_recv_x = torch.zeros(handle.num_recv_rows, VECTOR_BYTES // 2, dtype=torch.bfloat16,
                                      device=ctx.device)
        elif grad_recv_x is None:
            grad_recv_x = torch.zeros(handle.num_recv_rows, handle.hidden, dtype=torch.bfloat16, device=ctx.device)
        weights = None
        if want_weights:
            slots = ctx.recv_slots
            grad = torch.zeros(slots.shape, device=ctx.device) if grad_recv_topk_weights is None \
                else grad_recv_topk_weights.float()
            # Slots naming another rank's expert hold a constant 0: no gradient flows through them.
            weights = _aligned(torch.where(slots, grad, torch.zeros_like(grad)))
        grad_x, grad_weights, _ = buffer.combine(_aligned(grad_recv_x.to(torch.bfloat16)), handle,
                                                 topk_weights=weights)
        return (grad_x if want_x else None), grad_weights, None, None, None


def dispatch(buffer: Buffer, x: torch.Tensor, topk_weights: Optional[torch.Tensor], run: Callable):
    """`run()`, a plain dispatch returning a DispatchResult, under autograd. x: the bf16 input (or an
    FP8 payload, which carries no gradient). Returns that result with recv_x and recv_topk_weights
    tracked."""
    results: list = []
    recv_x, recv_topk_weights = _Dispatch.apply(x, topk_weights, buffer, run, results)
    result = results[0]
    result.recv_x, result.recv_topk_weights = recv_x, recv_topk_weights
    return result


class _Combine(torch.autograd.Function):
    """combined_x[t] = sum of token t's rows + biases; combined_topk_weights[t] = sum of its weight
    rows. Backward: cached dispatch of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, topk_weights: Optional[torch.Tensor], bias0: Optional[torch.Tensor],
                bias1: Optional[torch.Tensor], buffer: Buffer, handle: DispatchHandle, run: Callable, events: list):
        combined_x, combined_topk_weights, event = run()
        events.append(event)
        ctx.buffer, ctx.handle, ctx.device = buffer, handle, x.device
        ctx.num_topk = None if topk_weights is None else topk_weights.shape[1]
        ctx.bias_dtypes = [None if b is None else b.dtype for b in (bias0, bias1)]
        return combined_x, combined_topk_weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_combined_x: Optional[torch.Tensor], grad_combined_topk_weights: Optional[torch.Tensor]):
        buffer, handle = _live(ctx.buffer), ctx.handle
        want_x, want_weights, want_bias0, want_bias1 = ctx.needs_input_grad[:4]
        if grad_combined_x is None:
            grad_combined_x = torch.zeros(handle.num_tokens, handle.hidden, dtype=torch.bfloat16, device=ctx.device)
        grad_x = None
        if want_x:
            grad_x = buffer.dispatch(_aligned(grad_combined_x.to(torch.bfloat16)), handle=handle)[0]
        grad_weights = None
        if want_weights:
            grad_weights = _dispatch_float32(buffer, handle, grad_combined_topk_weights, ctx.num_topk, ctx.device)
        grad_bias = [grad_combined_x.to(dtype) if want else None
                     for want, dtype in zip((want_bias0, want_bias1), ctx.bias_dtypes)]
        return grad_x, grad_weights, grad_bias[0], grad_bias[1], None, None, None, None


def _dispatch_float32(buffer: Buffer, handle: DispatchHandle, rows: Optional[torch.Tensor], num_columns: int,
                      device: torch.device) -> torch.Tensor:
    """Cached dispatch of float32 [num_tokens, C] -> [num_recv_rows, C]. Dispatch moves bytes without
    reading them, so each float32 travels exactly as two bf16 halves (columns padded to whole 16-byte
    vectors)."""
    padded = -(-num_columns // 4) * 4
    send = torch.zeros(handle.num_tokens, padded, dtype=torch.float32, device=device)
    if rows is not None:
        send[:, :num_columns] = rows
    received = buffer.dispatch(send.view(torch.bfloat16), handle=handle)[0]
    return received.contiguous().view(torch.float32)[:, :num_columns].contiguous()


def combine(buffer: Buffer, handle: DispatchHandle, x: torch.Tensor, topk_weights: Optional[torch.Tensor],
            biases: List[Optional[torch.Tensor]], run: Callable) -> Tuple[torch.Tensor, Optional[torch.Tensor], object]:
    """`run()`, Buffer.combine returning (combined_x, combined_topk_weights, event), under autograd."""
    bias0, bias1 = (list(biases) + [None, None])[:2]
    events: list = []
    combined_x, combined_topk_weights = _Combine.apply(x, topk_weights, bias0, bias1, buffer, handle, run, events)
    return combined_x, combined_topk_weights, events[0]
