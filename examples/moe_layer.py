"""A Mixture-of-Experts layer on ep_comm's plain API: route, dispatch, run the local experts, combine.

Each rank holds num_experts / world_size experts (small MLPs) and a copy of the router. Gradients
flow through dispatch and combine (ep_comm/autograd.py), so the layer trains like any module; the
backward is collective, so every rank runs it, a rank with no tokens too.

    torchrun --nproc-per-node 4 examples/moe_layer.py     # CPU (gloo), or GPUs (nccl) when present
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ep_comm


class Expert(nn.Module):
    def __init__(self, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, ffn_hidden)
        self.down = nn.Linear(ffn_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class MoELayer(nn.Module):
    """x: [N, H] -> [N, H], sum over its top-k experts of (gate weight * expert(x)). Tokens travel
    as bf16; the router and the experts compute in their own dtype (float32 by default)."""

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, topk: int,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.num_experts, self.topk = num_experts, topk
        num_local = num_experts // dist.get_world_size(self.group)
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, ffn_hidden) for _ in range(num_local))

    def route(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-k softmax gate: (topk_idx int64 [N, K], topk_weights float32 [N, K], summing to 1)."""
        probs = torch.softmax(self.router(x.to(self.router.weight.dtype)).float(), dim=-1)
        topk_weights, topk_idx = probs.topk(self.topk, dim=-1)
        return topk_idx, topk_weights / topk_weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_idx, topk_weights = self.route(x)
        sent = ep_comm.dispatch(x.to(torch.bfloat16), topk_idx, topk_weights, num_experts=self.num_experts,
                                group=self.group)
        # One row per (token, rank); its slots name this rank's experts by local id (-1: elsewhere).
        rows = sent.recv_x.to(self.router.weight.dtype)
        out = torch.zeros_like(rows)
        for e, expert in enumerate(self.experts):
            chosen = sent.recv_topk_idx == e
            picked = chosen.any(dim=-1).nonzero().squeeze(1)
            gate = (sent.recv_topk_weights * chosen).sum(dim=-1)[picked, None]
            out = out.index_add(0, picked, gate * expert(rows[picked]))
        # Experts of one rank are summed above; combine sums the ranks' rows back per token.
        return ep_comm.combine(out.to(torch.bfloat16), sent.handle).combined_x.to(x.dtype)


def main() -> None:
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(rank)  # each rank its own experts and tokens
    hidden = 256
    layer = MoELayer(hidden, ffn_hidden=512, num_experts=2 * world, topk=2).to(device)
    for p in layer.router.parameters():
        dist.broadcast(p.data, src=0)  # the router is replicated
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(16 * (rank + 1), hidden, device=device)  # ranks may hold different numbers of tokens
    target = torch.randn_like(x)
    for step in range(5):
        loss = F.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        for p in layer.router.parameters():  # replicated: average its gradient (experts' are complete)
            dist.all_reduce(p.grad)
            p.grad /= world
        optimizer.step()
        losses = torch.tensor([loss.item()], device=device)
        dist.all_reduce(losses)
        if rank == 0:
            print(f"step {step}: mean loss over ranks {losses.item() / world:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
