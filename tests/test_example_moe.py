"""examples/moe_layer.py on 3 gloo ranks: forward and backward match the same layer computed densely.

The dense layer holds every rank's experts (gathered) and runs every rank's tokens in one process;
it must give this rank's outputs and the gradients of its tokens, its router (from its own tokens)
and its experts (from every rank's tokens). One rank has no tokens.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import types

import torch
import torch.distributed as dist
from torch import nn

from dist import run_ranks

SEED = 20261206
HIDDEN, FFN_HIDDEN, TOPK = 128, 32, 2
EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "moe_layer.py")


def _example():
    spec = importlib.util.spec_from_file_location("moe_layer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokens(rank: int) -> int:
    return [6, 0, 9][rank % 3]


def _rank_data(seed: int, rank: int):
    """(x, gradient of the output) of one rank, bf16-exact float32 so the bf16 transfer loses nothing."""
    g = torch.Generator().manual_seed(seed * 31 + rank)
    x = torch.randn(_tokens(rank), HIDDEN, generator=g).bfloat16().float()
    return x, torch.randn(_tokens(rank), HIDDEN, generator=g).bfloat16().float()


def _dense_forward(route, experts: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    topk_idx, topk_weights = route(x)
    outputs = torch.stack([expert(x) for expert in experts], dim=1)        # [N, E, H]
    picked = outputs.gather(1, topk_idx[..., None].expand(-1, -1, x.shape[1]))
    return (topk_weights[..., None] * picked).sum(dim=1)


def _close(got, want, what: str, seed: int) -> None:
    got = torch.zeros_like(want) if got is None else got
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1e-3)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * scale, msg=lambda m: f"{what} (seed {seed}): {m}")


def _body(rank, world, group, seed):
    example = _example()
    torch.manual_seed(seed + rank)
    layer = example.MoELayer(HIDDEN, FFN_HIDDEN, num_experts=2 * world, topk=TOPK, group=group)
    for p in layer.router.parameters():
        dist.broadcast(p.data, src=0, group=group)
    all_x = [_rank_data(seed, r) for r in range(world)]
    x = all_x[rank][0].clone().requires_grad_()
    y = layer(x)
    (y * all_x[rank][1]).sum().backward()

    # The dense layer: every rank's experts, and the router again (its gradient from this rank's tokens only).
    states = [None] * world
    dist.all_gather_object(states, [expert.state_dict() for expert in layer.experts], group=group)
    experts = nn.ModuleList()
    for state in (s for rank_states in states for s in rank_states):
        experts.append(example.Expert(HIDDEN, FFN_HIDDEN))
        experts[-1].load_state_dict(state)
    gate = types.SimpleNamespace(router=copy.deepcopy(layer.router), topk=TOPK)
    gate.router.zero_grad(set_to_none=True)

    def route(x_r):
        return example.MoELayer.route(gate, x_r)

    loss = 0
    for r, (x_r, grad_r) in enumerate(all_x):
        x_r = x_r.clone().requires_grad_(r == rank)
        if r == rank:
            mine = x_r
            want_y = _dense_forward(route, experts, x_r)
            loss = loss + (want_y * grad_r).sum()
        else:
            with torch.no_grad():
                fixed = route(x_r)
            # Other ranks' tokens reach this rank's experts, not its router.
            routed = _dense_forward(lambda _: fixed, experts, x_r)
            loss = loss + (routed * grad_r).sum()
    loss.backward()

    _close(y, want_y.detach(), "output", seed)
    _close(x.grad, mine.grad, "grad of x", seed)
    _close(layer.router.weight.grad, gate.router.weight.grad, "grad of the router", seed)
    first = rank * len(layer.experts)
    for e, expert in enumerate(layer.experts):
        for (name, p), want in zip(expert.named_parameters(), experts[first + e].parameters()):
            _close(p.grad, want.grad, f"grad of local expert {e} {name}", seed)


def test_example_moe_layer_matches_dense_layer():
    run_ranks(_body, 3, seed=SEED)
