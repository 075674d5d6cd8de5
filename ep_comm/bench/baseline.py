"""The baseline: the same dispatch/combine done the way a framework does it without ep_comm.

`AllToAllBaseline` runs over a process group (NCCL with one GPU per rank, gloo on CPU): permute the
tokens by destination rank, exchange counts and rows with `all_to_all_single` and split sizes, then
send the rows back and reduce them (normal mode: unweighted sum; low-latency: top-k weighted sum).

`EmulatedBaseline` is the single-process stand-in for one GPU shared by R ranks, where NCCL refuses
two ranks per device: one process holds every rank's inputs and performs the same permutations and
copies on the device, so its time is the whole job's time on that device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

from ep_comm import fp8


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """[rows, ...] -> uint8 [rows, row_bytes] (also for zero rows)."""
    t = t.contiguous()
    width = t.element_size()
    for size in t.shape[1:]:
        width *= size
    return t.view(torch.uint8).reshape(t.shape[0], width)


def _pack(parts: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
    views = [_bytes(p) for p in parts]
    return torch.cat(views, dim=1), [v.shape[1] for v in views]


def _unpack(packed: torch.Tensor, widths: List[int], dtypes: Sequence[torch.dtype]) -> List[torch.Tensor]:
    return [p.contiguous().view(d) for p, d in zip(torch.split(packed, widths, dim=1), dtypes)]


@dataclass
class NormalState:
    send_token: torch.Tensor   # int64 [rows sent]: token of each row, destination-rank major
    send_counts: List[int]
    recv_counts: List[int]
    num_tokens: int


@dataclass
class LowLatencyState:
    send_token: torch.Tensor   # int64 [selections]: token of each sent row, (global expert, token) order
    send_weight_slot: torch.Tensor  # int64: flat (token*K + slot) of each sent row
    send_counts: List[int]
    recv_counts: List[int]
    recv_order: torch.Tensor   # received row -> position in the expert-major layout
    num_tokens: int


class AllToAllBaseline:
    def __init__(self, group: dist.ProcessGroup, exchange_on_host: bool = False) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.exchange_on_host = exchange_on_host

    def _counts(self, send_counts: torch.Tensor) -> List[int]:
        send = send_counts.to(torch.int64)
        send = send.cpu() if self.exchange_on_host else send
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.tolist()

    def _rows(self, rows: torch.Tensor, send_counts: List[int], recv_counts: List[int]) -> torch.Tensor:
        device = rows.device
        rows = rows.cpu() if self.exchange_on_host else rows
        out = torch.empty(sum(recv_counts), rows.shape[1], dtype=rows.dtype, device=rows.device)
        dist.all_to_all_single(out, rows, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                               group=self.group)
        return out.to(device)

    # ---- normal mode -------------------------------------------------------------------------
    def dispatch(self, x, topk_idx: torch.Tensor, topk_weights: torch.Tensor, is_token_in_rank: torch.Tensor):
        """x: bf16 [N, H] or (fp8 [N, H], f32 [N, H/128]) -> (received parts, state). Rows arrive
        source-rank major, token ascending (the order ep_comm returns)."""
        dest, token = torch.nonzero(is_token_in_rank.t(), as_tuple=True)
        send_counts = torch.bincount(dest, minlength=self.world)
        recv_counts = self._counts(send_counts)
        send_counts_list = send_counts.tolist()
        parts = list(x) if isinstance(x, tuple) else [x]
        parts = [p[token] for p in parts] + [topk_idx[token], topk_weights[token]]
        packed, widths = _pack(parts)
        received = self._rows(packed, send_counts_list, recv_counts)
        out = _unpack(received, widths, [p.dtype for p in parts])
        return out, NormalState(token, send_counts_list, recv_counts, is_token_in_rank.shape[0])

    def combine(self, rows: torch.Tensor, state: NormalState) -> torch.Tensor:
        """rows: bf16 [received, H] -> bf16 [N, H], the float32 sum of each token's returned rows."""
        back = self._rows(_bytes(rows), state.recv_counts, state.send_counts).view(rows.dtype)
        out = torch.zeros(state.num_tokens, rows.shape[1], dtype=torch.float32, device=rows.device)
        out.index_add_(0, state.send_token, back.float())
        return out.to(rows.dtype)

    # ---- low-latency mode --------------------------------------------------------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, use_fp8: bool):
        """One row per (token, expert); received rows are regrouped contiguously by local expert.
        Returns (rows [selections received, H] (fp8: (payload, scales)), rows per local expert, state)."""
        num_tokens, num_topk = topk_idx.shape
        per_rank = num_experts // self.world
        flat = topk_idx.reshape(-1)
        slots = torch.nonzero(flat >= 0, as_tuple=True)[0]
        slots = slots[torch.sort(flat[slots], stable=True).indices]
        experts = flat[slots]
        tokens = slots // num_topk
        send_counts = torch.bincount(experts // per_rank, minlength=self.world)
        recv_counts = self._counts(send_counts)
        send_counts_list = send_counts.tolist()
        if use_fp8:
            payload, scales = fp8.per_token_cast_to_fp8(x)
            parts = [payload[tokens], scales[tokens], experts]
        else:
            parts = [x[tokens], experts]
        packed, widths = _pack(parts)
        received = _unpack(self._rows(packed, send_counts_list, recv_counts), widths, [p.dtype for p in parts])
        local = received[-1].reshape(-1) - self.rank * per_rank
        order = torch.sort(local, stable=True).indices
        counts = torch.bincount(local, minlength=per_rank)
        data = [r[order] for r in received[:-1]]
        state = LowLatencyState(tokens, slots, send_counts_list, recv_counts, order, num_tokens)
        return (tuple(data) if use_fp8 else data[0]), counts, state

    def low_latency_combine(self, rows: torch.Tensor, topk_weights: torch.Tensor,
                            state: LowLatencyState) -> torch.Tensor:
        """rows: bf16 [selections received, H] in expert-major order -> bf16 [N, H] weighted sum."""
        in_received_order = torch.empty_like(rows)
        in_received_order[state.recv_order] = rows
        back = self._rows(_bytes(in_received_order), state.recv_counts, state.send_counts).view(rows.dtype)
        back = back.float()
        weights = topk_weights.reshape(-1)[state.send_weight_slot]
        out = torch.zeros(state.num_tokens, rows.shape[1], dtype=torch.float32, device=rows.device)
        out.index_add_(0, state.send_token, back * weights[:, None])
        return out.to(rows.dtype)


class EmulatedBaseline:
    """All ranks' permutations and copies in one process (one GPU shared by every rank)."""

    def __init__(self, world: int) -> None:
        self.world = world

    def dispatch(self, xs: Sequence, is_token_in_rank: Sequence[torch.Tensor]):
        """xs[src]: bf16 [N_src, H] or (fp8, scales) -> per destination the received parts, plus the
        per-source send order (for combine)."""
        orders = []
        pieces = [[] for _ in range(self.world)]
        for src, (x, in_rank) in enumerate(zip(xs, is_token_in_rank)):
            dest, token = torch.nonzero(in_rank.t(), as_tuple=True)
            counts = torch.bincount(dest, minlength=self.world).tolist()
            parts = list(x) if isinstance(x, tuple) else [x]
            gathered = [p[token] for p in parts]
            begin = 0
            for d, c in enumerate(counts):
                pieces[d].append([g[begin:begin + c] for g in gathered])
                begin += c
            orders.append((token, counts))
        received = [[torch.cat([piece[i] for piece in pieces[d]]) for i in range(len(pieces[d][0]))]
                    for d in range(self.world)]
        return received, orders

    def combine(self, rows: Sequence[torch.Tensor], orders, num_tokens: Sequence[int]) -> List[torch.Tensor]:
        """rows[dest]: bf16 [received, H] (source-major) -> per source bf16 [N_src, H]."""
        hidden = rows[0].shape[1]
        per_dest_splits = [list(torch.split(rows[d], [orders[s][1][d] for s in range(self.world)]))
                           for d in range(self.world)]
        out = []
        for s, (token, counts) in enumerate(orders):
            back = torch.cat([per_dest_splits[d][s] for d in range(self.world)])
            acc = torch.zeros(num_tokens[s], hidden, dtype=torch.float32, device=back.device)
            acc.index_add_(0, token, back.float())
            out.append(acc.to(rows[0].dtype))
        return out

    def low_latency_dispatch(self, xs: Sequence[torch.Tensor], topk_idx: Sequence[torch.Tensor], num_experts: int,
                             use_fp8: bool):
        """Per destination: rows grouped by local expert (source-major within an expert)."""
        per_rank = num_experts // self.world
        rows_by_expert = [[] for _ in range(num_experts)]
        states = []
        for x, idx in zip(xs, topk_idx):
            flat = idx.reshape(-1)
            slots = torch.nonzero(flat >= 0, as_tuple=True)[0]
            slots = slots[torch.sort(flat[slots], stable=True).indices]
            experts = flat[slots]
            tokens = slots // idx.shape[1]
            parts = list(fp8.per_token_cast_to_fp8(x)) if use_fp8 else [x]
            gathered = [p[tokens] for p in parts]
            counts = torch.bincount(experts, minlength=num_experts).tolist()
            begin = 0
            for e, c in enumerate(counts):
                rows_by_expert[e].append([g[begin:begin + c] for g in gathered])
                begin += c
            states.append((tokens, slots, counts))
        received = []
        for d in range(self.world):
            chunks = [piece for e in range(d * per_rank, (d + 1) * per_rank) for piece in rows_by_expert[e]]
            received.append([torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))])
        return received, states

    def low_latency_combine(self, rows: Sequence[torch.Tensor], topk_weights: Sequence[torch.Tensor], states,
                            num_experts: int) -> List[torch.Tensor]:
        """rows[dest]: bf16 [selections, H] in (local expert, source) order -> per source the weighted sum."""
        per_rank = num_experts // self.world
        hidden = rows[0].shape[1]
        # Split each destination's rows back into (expert, source) pieces.
        pieces = {}
        for d in range(self.world):
            sizes = [states[s][2][e] for e in range(d * per_rank, (d + 1) * per_rank) for s in range(self.world)]
            for n, chunk in enumerate(torch.split(rows[d], sizes)):
                e, s = d * per_rank + n // self.world, n % self.world
                pieces[(e, s)] = chunk
        out = []
        for s, (tokens, slots, counts) in enumerate(states):
            back = torch.cat([pieces[(e, s)] for e in range(num_experts)]).float()
            weights = topk_weights[s].reshape(-1)[slots]
            acc = torch.zeros(topk_weights[s].shape[0], hidden, dtype=torch.float32, device=back.device)
            acc.index_add_(0, tokens, back * weights[:, None])
            out.append(acc.to(rows[0].dtype))
        return out
