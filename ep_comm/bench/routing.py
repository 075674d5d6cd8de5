"""Routing for the benchmarks: which experts each token picks, and what the choice costs in balance.

Real MoE routers do not pick experts uniformly: a few experts are popular and some are idle, and a
rank that holds popular experts receives more rows than the others while everyone waits for it.
These generators make that traffic on purpose, seeded, so a benchmark can show what skew costs:

  uniform   every expert equally likely
  zipf:S    expert popularity p(e) ~ 1 / rank(e)^S, popularity order a seeded permutation of the
            experts (S = 0 is uniform; S around 1 is strongly skewed)
  hot:K     K seeded hot experts: every token takes min(K, topk) of them, the rest uniformly
            from the other experts
  incast    every token's experts live on one rank (rank 0; `incast:R` for rank R)

Every token always names `topk` distinct experts (no -1 slots): sampling is without replacement.
Popularity is global (the same on every source rank); which token picks what differs per rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

KINDS = ("uniform", "zipf", "hot", "incast")


@dataclass(frozen=True)
class Routing:
    kind: str                  # one of KINDS
    param: Optional[float] = None   # zipf: exponent S; hot: K; incast: target rank

    def __str__(self) -> str:
        if self.param is None:
            return self.kind
        value = int(self.param) if self.kind in ("hot", "incast") else self.param
        return f"{self.kind}:{value:g}" if isinstance(value, float) else f"{self.kind}:{value}"


def parse(text: str) -> Routing:
    """'uniform' | 'zipf:S' (S >= 0) | 'hot:K' (K >= 1) | 'incast' | 'incast:R' -> Routing.
    Raises ValueError saying what was expected."""
    kind, _, arg = text.strip().partition(":")
    kind = kind.lower()
    if kind not in KINDS:
        raise ValueError(f"routing must be one of uniform, zipf:S, hot:K, incast[:R], got {text!r}")
    if kind == "uniform":
        if arg:
            raise ValueError(f"'uniform' takes no parameter, got {text!r}")
        return Routing("uniform")
    if kind == "zipf":
        try:
            s = float(arg)
        except ValueError:
            raise ValueError(f"zipf needs an exponent, e.g. zipf:1.2, got {text!r}") from None
        if not s >= 0:
            raise ValueError(f"the zipf exponent must be >= 0, got {text!r}")
        return Routing("zipf", s)
    if kind == "hot":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"hot needs a number of hot experts >= 1, e.g. hot:4, got {text!r}")
        return Routing("hot", float(int(arg)))
    if arg and not arg.isdigit():
        raise ValueError(f"incast takes an optional target rank, e.g. incast:0, got {text!r}")
    return Routing("incast", float(int(arg or 0)))


def check(routing: Routing, num_experts: int, topk: int, world: int) -> None:
    """Refuse combinations that cannot give every token topk distinct experts."""
    if routing.kind == "hot" and routing.param > num_experts:
        raise ValueError(f"hot:{int(routing.param)} needs at most {num_experts} hot experts (--experts)")
    if routing.kind == "incast":
        target, per_rank = int(routing.param), num_experts // world
        if target >= world:
            raise ValueError(f"incast:{target} names a rank, but there are {world} ranks")
        if topk > per_rank:
            raise ValueError(f"incast sends every token to one rank, which holds {per_rank} experts; "
                             f"topk {topk} distinct experts do not fit there (use more experts or fewer ranks)")


def _generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def popularity(routing: Routing, num_experts: int, seed: int) -> torch.Tensor:
    """float64 [E]: the probability weight of each expert (not normalised for zipf's order)."""
    if routing.kind != "zipf":
        return torch.ones(num_experts, dtype=torch.float64)
    order = torch.randperm(num_experts, generator=_generator(seed, 7919))   # which expert is the i-th most popular
    weights = torch.empty(num_experts, dtype=torch.float64)
    weights[order] = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** routing.param
    return weights


def hot_experts(routing: Routing, num_experts: int, seed: int) -> torch.Tensor:
    """int64 [K]: the hot experts of hot:K, spread over the ranks by a seeded permutation."""
    return torch.randperm(num_experts, generator=_generator(seed, 7907))[: int(routing.param)]


def _sample_distinct(log_weights: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    """Rows of `count` distinct columns drawn without replacement in proportion to exp(log_weights)
    (the Gumbel top-k trick: one vectorised draw per row, no Python loop over tokens)."""
    if count == 0:
        return torch.empty(log_weights.shape[0], 0, dtype=torch.int64)
    u = torch.rand(log_weights.shape, generator=g, dtype=torch.float64).clamp_(min=1e-300)
    keys = log_weights - torch.log(-torch.log(u))
    return keys.topk(count, dim=1).indices.to(torch.int64)


def topk_idx(routing: Routing, num_tokens: int, num_experts: int, topk: int, rank: int, world: int,
             seed: int) -> torch.Tensor:
    """int64 [num_tokens, topk]: the experts of each token of `rank`, distinct within a token."""
    check(routing, num_experts, topk, world)
    g = _generator(seed, 104_729 + rank)
    if routing.kind in ("uniform", "zipf"):
        logw = popularity(routing, num_experts, seed).log().expand(num_tokens, num_experts)
        return _sample_distinct(logw, topk, g)
    if routing.kind == "incast":
        per_rank = num_experts // world
        base = int(routing.param) * per_rank
        return base + _sample_distinct(torch.zeros(num_tokens, per_rank, dtype=torch.float64), topk, g)
    hot = hot_experts(routing, num_experts, seed)
    is_hot = torch.zeros(num_experts, dtype=torch.bool)
    is_hot[hot] = True
    cold = torch.nonzero(~is_hot).flatten()
    from_hot = min(len(hot), topk)
    picks_hot = hot[_sample_distinct(torch.zeros(num_tokens, len(hot), dtype=torch.float64), from_hot, g)]
    picks_cold = cold[_sample_distinct(torch.zeros(num_tokens, len(cold), dtype=torch.float64), topk - from_hot, g)]
    picks = torch.cat([picks_hot, picks_cold], dim=1)
    # Shuffle the slots so a hot expert is not always in slot 0 (slot order matters to nothing we
    # time, but a reader of the inputs should not see an artefact of the generator).
    order = torch.rand(num_tokens, topk, generator=g).argsort(dim=1)
    return picks.gather(1, order)


def _summary(values: Sequence[float]) -> Dict[str, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    mean = float(t.mean()) if len(t) else 0.0
    return {"min": float(t.min()) if len(t) else 0.0, "median": float(t.median()) if len(t) else 0.0,
            "max": float(t.max()) if len(t) else 0.0, "mean": mean,
            "max_over_mean": float(t.max()) / mean if mean > 0 else 0.0}


def imbalance(topk_per_rank: Sequence[torch.Tensor], num_experts: int, world: int) -> Dict[str, object]:
    """What a routing does to the ranks and experts, from every source rank's topk_idx.

    tokens_per_expert: (token, expert) selections each expert receives, summarised over experts;
    normal_rows_per_rank: rows each rank receives in normal mode (one per token with an expert there);
    low_latency_rows_per_rank: rows each rank receives in low-latency mode (one per (token, expert)).
    Each summary has min, median, max, mean and max_over_mean (1.0 = perfectly balanced)."""
    per_rank = num_experts // world
    counts = torch.zeros(num_experts, dtype=torch.int64)
    normal = torch.zeros(world, dtype=torch.int64)
    for idx in topk_per_rank:
        valid = idx[idx >= 0]
        counts += torch.bincount(valid, minlength=num_experts)
        dest = torch.where(idx >= 0, idx // per_rank, torch.full_like(idx, -1))
        for r in range(world):
            normal[r] += int((dest == r).any(dim=1).sum())
    low_latency = counts.view(world, per_rank).sum(dim=1)
    experts = _summary(counts.tolist())
    experts["idle"] = int((counts == 0).sum())
    top = max(1, num_experts // 20)
    total = int(counts.sum())
    experts["top5pct_share"] = float(counts.sort(descending=True).values[:top].sum()) / total if total else 0.0
    return {"tokens_per_expert": experts, "normal_rows_per_rank": _summary(normal.tolist()),
            "low_latency_rows_per_rank": _summary(low_latency.tolist()),
            "normal_rows": normal.tolist(), "low_latency_rows": low_latency.tolist()}


def describe(summary: Dict[str, object]) -> str:
    """One line for the report header."""
    e, n, ll = summary["tokens_per_expert"], summary["normal_rows_per_rank"], summary["low_latency_rows_per_rank"]
    return (f"tokens per expert min/median/max {e['min']:.0f}/{e['median']:.0f}/{e['max']:.0f} "
            f"(max/mean {e['max_over_mean']:.2f}, idle {e['idle']}, top 5% of experts get {100 * e['top5pct_share']:.0f}%); "
            f"rows received per rank max/mean: normal {n['max_over_mean']:.2f}, low-latency {ll['max_over_mean']:.2f}")


# ---- model presets ------------------------------------------------------------------------------------
# From each model's config.json on the Hugging Face Hub (the routed experts; shared experts are
# computed locally and never dispatched).
MODELS: Dict[str, Dict[str, object]] = {
    "deepseek-v3": dict(hidden=7168, experts=256, topk=8,
                        source="deepseek-ai/DeepSeek-V3 config.json: hidden_size 7168, n_routed_experts 256, "
                               "num_experts_per_tok 8"),
    "kimi-k2": dict(hidden=7168, experts=384, topk=8,
                    source="moonshotai/Kimi-K2-Instruct config.json: hidden_size 7168, n_routed_experts 384, "
                           "num_experts_per_tok 8"),
    "qwen3-235b-a22b": dict(hidden=4096, experts=128, topk=8,
                            source="Qwen/Qwen3-235B-A22B config.json: hidden_size 4096, num_experts 128, "
                                   "num_experts_per_tok 8"),
    "mixtral-8x22b": dict(hidden=6144, experts=8, topk=2,
                          source="mistralai/Mixtral-8x22B-v0.1 config.json: hidden_size 6144, num_local_experts 8, "
                                 "num_experts_per_tok 2"),
}


def model_help() -> List[str]:
    return [f"{name}: hidden {m['hidden']}, top-{m['topk']} of {m['experts']} experts ({m['source']})"
            for name, m in MODELS.items()]
