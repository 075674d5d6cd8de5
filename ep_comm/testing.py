"""Test and benchmark helpers: seeded inputs and a loop-by-loop emulator of the whole exchange.

The emulator is deliberately naive (Python loops over tokens, no collectives): every rank rebuilds
all ranks' inputs from the seed and computes what it must receive. It checks the reference backend,
which in turn is the oracle for the kernels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from ep_comm import fp8


@dataclass
class RankInputs:
    x: torch.Tensor             # bf16 [N, H]
    topk_idx: torch.Tensor      # int64 [N, K], distinct experts per token, some -1
    topk_weights: torch.Tensor  # float32 [N, K], 0 where topk_idx is -1


def make_inputs(seed: int, rank: int, num_tokens: int, hidden: int, num_topk: int, num_experts: int,
                masked_fraction: float = 0.1) -> RankInputs:
    """Fresh random inputs of one rank (CPU). Never all zeros; rows get distinct magnitudes."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    x = torch.randn(num_tokens, hidden, generator=g) * (1 + torch.rand(num_tokens, 1, generator=g) * 4)
    scores = torch.rand(num_tokens, num_experts, generator=g)
    topk_idx = scores.topk(num_topk, dim=1).indices.to(torch.int64)
    masked = torch.rand(num_tokens, num_topk, generator=g) < masked_fraction
    topk_idx = torch.where(masked, torch.full_like(topk_idx, -1), topk_idx)
    topk_weights = torch.rand(num_tokens, num_topk, generator=g) + 0.1
    topk_weights = torch.where(topk_idx >= 0, topk_weights, torch.zeros_like(topk_weights))
    return RankInputs(x.to(torch.bfloat16), topk_idx, topk_weights)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine-style similarity in float64 (DeepEP's measure): 0 for equal tensors."""
    x, y = x.double(), y.double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


@dataclass
class ExpectedDispatch:
    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert: List[int]
    sources: List[tuple]        # (source rank, token) of each received row


def expected_dispatch(all_inputs: Sequence[RankInputs], rank: int, num_experts: int,
                      expert_alignment: int = 1) -> ExpectedDispatch:
    num_ranks = len(all_inputs)
    per_rank = num_experts // num_ranks
    rows, ids, weights, sources = [], [], [], []
    counts = [0] * per_rank
    for src, inp in enumerate(all_inputs):
        for t in range(inp.x.shape[0]):
            experts = inp.topk_idx[t].tolist()
            if not any(e >= 0 and e // per_rank == rank for e in experts):
                continue
            local = [e - rank * per_rank if e >= 0 and e // per_rank == rank else -1 for e in experts]
            rows.append(inp.x[t])
            ids.append(local)
            weights.append([float(w) if l >= 0 else 0.0 for w, l in zip(inp.topk_weights[t].tolist(), local)])
            sources.append((src, t))
            for e in set(local) - {-1}:
                counts[e] += 1
    hidden = all_inputs[0].x.shape[1]
    num_topk = all_inputs[0].topk_idx.shape[1]
    recv_x = torch.stack(rows) if rows else torch.empty(0, hidden, dtype=torch.bfloat16)
    return ExpectedDispatch(
        recv_x, torch.tensor(ids, dtype=torch.int64).reshape(-1, num_topk),
        torch.tensor(weights, dtype=torch.float32).reshape(-1, num_topk),
        [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in counts], sources)


def expected_combine(all_expected: Sequence[ExpectedDispatch], all_rows: Sequence[torch.Tensor], rank: int,
                     num_tokens: int, bias: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """What `rank` gets back when every rank d returns all_rows[d] (one row per received token):
    a float32 sum in destination-rank order, plus the biases, rounded to bf16."""
    hidden = all_rows[0].shape[1]
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for dest, expected in enumerate(all_expected):
        for row, (src, t) in zip(all_rows[dest], expected.sources):
            if src == rank:
                out[t] += row.float()
    for b in bias:
        out += b.float()
    return out.to(torch.bfloat16)


@dataclass
class ExpectedLowLatencyDispatch:
    recv_count: List[int]
    rows: List[List[tuple]]     # per local expert: (source rank, token) of each row, in order


def expected_low_latency_dispatch(all_inputs: Sequence[RankInputs], rank: int,
                                  num_experts: int) -> ExpectedLowLatencyDispatch:
    num_ranks = len(all_inputs)
    per_rank = num_experts // num_ranks
    rows: List[List[tuple]] = [[] for _ in range(per_rank)]
    for e in range(per_rank):
        for src, inp in enumerate(all_inputs):
            for t in range(inp.x.shape[0]):
                if rank * per_rank + e in inp.topk_idx[t].tolist():
                    rows[e].append((src, t))
    return ExpectedLowLatencyDispatch([len(r) for r in rows], rows)


def expected_low_latency_combine(inputs: RankInputs, expert_output, rank: int, num_experts: int,
                                 num_ranks: int) -> torch.Tensor:
    """Weighted sum over top-k slots (slot order, float32) where expert_output(expert, src, token) -> [H]."""
    num_tokens, hidden = inputs.x.shape
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for t in range(num_tokens):
        for k, e in enumerate(inputs.topk_idx[t].tolist()):
            if e >= 0:
                out[t] += inputs.topk_weights[t, k] * expert_output(e, rank, t).float()
    return out.to(torch.bfloat16)


def fp8_tuple(x: torch.Tensor):
    """bf16 [N, H] -> (float8_e4m3fn [N, H], float32 scales [N, H/128]) for FP8 dispatch inputs."""
    return fp8.per_token_cast_to_fp8(x)
