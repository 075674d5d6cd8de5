"""Gradients through ep_comm.dispatch/combine match autograd on a dense, single-process equivalent.

Every rank rebuilds all ranks' inputs from the seed, runs the same toy MoE densely (each token
times its experts' scales, weighted by its top-k weights) and compares its own tokens' gradients
with what backward through dispatch and combine gave. One rank has no tokens.
"""
from __future__ import annotations

import pytest
import torch

import ep_comm
from ep_comm import _ext
from dist import run_ranks
from ep_comm.testing import make_inputs

SEED = 20261206
HIDDEN = 128
NUM_TOPK = 3
EXPERTS_PER_RANK = 2


def _tokens(rank: int) -> int:
    return [5, 0, 7][rank % 3]


def _rank_data(seed: int, rank: int, num_experts: int):
    """(inputs, gradient of combined_x, gradient of combined_topk_weights) of one rank; bf16-exact values."""
    inputs = make_inputs(seed, rank, _tokens(rank), HIDDEN, NUM_TOPK, num_experts)
    g = torch.Generator().manual_seed(seed * 7 + rank)
    grad_out = torch.randn(_tokens(rank), HIDDEN, generator=g).bfloat16()
    grad_weights = torch.randn(_tokens(rank), NUM_TOPK, generator=g)
    return inputs, grad_out, grad_weights


def _expert_scales(seed: int, num_experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 99)
    return 0.5 + torch.rand(num_experts, HIDDEN, generator=g)   # float32 [E, H]


def _dense_grads(seed: int, world: int, rank: int, num_experts: int):
    """Gradients of this rank's x and topk_weights for the dense MoE over every rank's tokens."""
    scales = _expert_scales(seed, num_experts)
    loss = 0
    mine = None
    for r in range(world):
        inputs, grad_out, _ = _rank_data(seed, r, num_experts)
        x = inputs.x.float().requires_grad_()
        w = inputs.topk_weights.clone().requires_grad_()
        idx = inputs.topk_idx
        picked = torch.where(idx[..., None] >= 0, scales[idx.clamp(min=0)], 0.0)   # [N, K, H]
        out = (w[..., None] * picked * x[:, None, :]).sum(1)
        loss = loss + (out * grad_out.float()).sum()
        if r == rank:
            mine = (x, w)
    loss.backward()
    return mine[0].grad, mine[1].grad


def _experts(recv_x, recv_topk_idx, recv_topk_weights, scales_local):
    """Each received row times its local experts' scales, weighted: one row per (token, rank)."""
    picked = torch.where(recv_topk_idx[..., None] >= 0, scales_local[recv_topk_idx.clamp(min=0)], 0.0)
    return (recv_topk_weights[..., None] * picked * recv_x.float()[:, None, :]).sum(1).bfloat16()


def _close(got: torch.Tensor, want: torch.Tensor, what: str, seed: int) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * scale,
                               msg=lambda m: f"{what} (seed {seed}): {m}")


def _autograd_body(rank, world, group, seed, low_latency=False):
    num_experts = EXPERTS_PER_RANK * world
    inputs, grad_out, grad_combined_weights = _rank_data(seed, rank, num_experts)
    scales_local = _expert_scales(seed, num_experts)[rank * EXPERTS_PER_RANK:(rank + 1) * EXPERTS_PER_RANK]

    # No gradient wanted: the outputs are plain tensors, as before.
    plain = ep_comm.dispatch(inputs.x, inputs.topk_idx, inputs.topk_weights, num_experts=num_experts)
    assert plain.recv_x.grad_fn is None and plain.recv_topk_weights.grad_fn is None

    # dispatch -> experts -> combine; backward is combine -> experts' backward -> cached dispatch.
    x = inputs.x.clone().requires_grad_()
    w = inputs.topk_weights.clone().requires_grad_()
    result = ep_comm.dispatch(x, inputs.topk_idx, w, num_experts=num_experts)
    assert result.recv_x.grad_fn is not None
    out = _experts(result.recv_x, result.recv_topk_idx, result.recv_topk_weights, scales_local)
    combined = ep_comm.combine(out, result.handle, async_finish=True)
    combined.event.current_stream_wait()   # the backward itself needs no event: its calls are synchronous
    (combined.combined_x.float() * grad_out.float()).sum().backward()
    want_x, want_w = _dense_grads(seed, world, rank, num_experts)
    _close(x.grad, want_x, "grad of x", seed)
    _close(w.grad, want_w, "grad of topk_weights", seed)

    # Only the weights want a gradient: recv_x is data, and the backward combine carries the weights alone.
    w = inputs.topk_weights.clone().requires_grad_()
    result = ep_comm.dispatch(inputs.x, inputs.topk_idx, w, num_experts=num_experts)
    assert not result.recv_x.requires_grad and result.recv_topk_weights.requires_grad
    out = _experts(result.recv_x, result.recv_topk_idx, result.recv_topk_weights, scales_local)
    (ep_comm.combine(out, result.handle).combined_x.float() * grad_out.float()).sum().backward()
    _close(w.grad, want_w, "grad of topk_weights alone", seed)

    # combine's weight path, its biases and a plain cached dispatch, each with its own gradient.
    x = inputs.x.clone().requires_grad_()
    w = inputs.topk_weights.clone().requires_grad_()
    bias = torch.zeros(_tokens(rank), HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    result = ep_comm.dispatch(x, inputs.topk_idx, w, num_experts=num_experts)
    again = ep_comm.dispatch(x, handle=result.handle)
    assert again.handle is result.handle and again.recv_topk_idx is None
    assert torch.equal(again.recv_x, result.recv_x)
    back = ep_comm.combine(result.recv_x + again.recv_x, result.handle, topk_weights=result.recv_topk_weights,
                           bias=(None, bias))
    # The weight path sums each slot from the one rank that holds its expert: the weights come back.
    assert torch.equal(back.combined_topk_weights, inputs.topk_weights)
    loss = (back.combined_x.float() * grad_out.float()).sum()
    (loss + (back.combined_topk_weights * grad_combined_weights).sum()).backward()
    copies = inputs.topk_idx.ge(0).logical_and(
        inputs.topk_idx // EXPERTS_PER_RANK == torch.arange(world)[:, None, None]).any(-1).sum(0)   # ranks per token
    _close(x.grad, 2 * copies[:, None] * grad_out.float(), "grad of x through dispatch, cached dispatch, combine",
           seed)
    # Empty slots (-1) travel as a constant 0, so they get no gradient.
    _close(w.grad, grad_combined_weights * inputs.topk_idx.ge(0), "grad of topk_weights through combine's weight path",
           seed)
    assert torch.equal(bias.grad, grad_out)

    # FP8 carries no gradient: refused, on every rank alike.
    x_fp8, x_scales = ep_comm.fp8.per_token_cast_to_fp8(inputs.x)
    with pytest.raises(TypeError, match="carries no gradient"):
        ep_comm.dispatch((x_fp8, x_scales.requires_grad_()), inputs.topk_idx, num_experts=num_experts)
    # Whether a rank's backward will call combine is part of the call: ranks that differ are refused.
    with pytest.raises(ep_comm.EpCommMismatch, match="autograd"):
        ep_comm.dispatch(inputs.x.clone().requires_grad_(rank == 0), inputs.topk_idx, num_experts=num_experts)
    ep_comm.get_buffer(group).destroy()
    if low_latency:
        # Low-latency mode is for inference: outputs are data, whatever requires grad.
        x = inputs.x.clone().requires_grad_()
        w = inputs.topk_weights.clone().requires_grad_()
        sent = ep_comm.low_latency_dispatch(x, inputs.topk_idx, 8, num_experts, group=group, use_fp8=False)
        back = ep_comm.low_latency_combine(sent.recv_x.clone().requires_grad_(), inputs.topk_idx, w, sent.handle)
        assert not sent.recv_x.requires_grad and not back.combined_x.requires_grad
        ep_comm.get_buffer(group, low_latency=True).destroy()


def test_gradients_match_dense_moe_reference():
    run_ranks(_autograd_body, 3, seed=SEED, low_latency=True)


@pytest.mark.skipif(not _ext.emulated_available(), reason=f"ep_comm._C_emu is not built: "
                                                           f"{_ext.emulated_unavailable_reason()}")
def test_gradients_match_dense_moe_emulated(monkeypatch):
    monkeypatch.setenv("EP_COMM_BACKEND", "emulated")
    run_ranks(_autograd_body, 2, seed=SEED + 1)
