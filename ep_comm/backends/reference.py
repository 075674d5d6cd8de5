"""The reference backend: the API contract on torch.distributed.all_to_all_single.

It is the oracle every kernel is tested against and the fallback wherever kernels are unavailable
(CPU tensors, gloo groups, no GPU). Each call packs all per-row payloads (hidden states, FP8 scales,
top-k ids and weights) into one byte matrix, so one dispatch is one count exchange plus one
all_to_all_single. Reductions accumulate in float32 in a fixed order (destination rank ascending,
then top-k slot ascending), so results are deterministic and kernels can be compared tightly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ep_comm import fp8
from ep_comm.agreement import wait_for
from ep_comm.backends.base import (Backend, BackendContext, DispatchArgs, DispatchHandle, DispatchOutput,
                                   LowLatencyCombineArgs, LowLatencyDispatchArgs, LowLatencyDispatchOutput,
                                   LowLatencyHandle)
from ep_comm.config import Config


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[rows, ...] any dtype -> uint8 [rows, row_bytes] sharing nothing with `t`'s strides."""
    t = t.contiguous()
    row_bytes = math.prod(t.shape[1:]) * t.element_size()
    return t.view(torch.uint8).reshape(t.shape[0], row_bytes)


def _from_bytes(b: torch.Tensor, dtype: torch.dtype, trailing: Sequence[int]) -> torch.Tensor:
    # A column slice of one row counts as contiguous with its packed row stride, which view(dtype)
    # refuses when the stride is not a multiple of the element size: copy it into a fresh tensor.
    b = b.contiguous() if b.shape[0] > 1 else b.clone(memory_format=torch.contiguous_format)
    return b.view(dtype).reshape(b.shape[0], *trailing)


def _pack_rows(parts: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
    """Concatenate the byte views of several [rows, ...] tensors; return the widths to split them."""
    views = [_as_bytes(p) for p in parts]
    return torch.cat(views, dim=1), [v.shape[1] for v in views]


def _unpack_rows(packed: torch.Tensor, widths: List[int]) -> List[torch.Tensor]:
    return list(torch.split(packed, widths, dim=1))


def _tokens_per_expert(local_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E]: how many rows name each expert at least once (-1 slots ignored, duplicates once)."""
    rows = local_idx.shape[0]
    hits = torch.zeros(rows, num_experts + 1, dtype=torch.bool, device=local_idx.device)
    hits.scatter_(1, torch.where(local_idx < 0, num_experts, local_idx), True)
    return hits[:, :num_experts].sum(0)


@dataclass
class _NormalLayout:
    send_index: torch.Tensor    # int64 [num_sent]: token of each sent row, destination-rank major
    send_counts: List[int]      # rows sent to each rank
    recv_counts: List[int]      # rows received from each rank
    num_recv_tokens: int


@dataclass
class _LowLatencyLayout:
    send_flat_slots: torch.Tensor   # int64 [P]: flat (token*K + slot) of each sent row, (expert, token) order
    send_counts: List[int]          # rows sent to each rank
    recv_counts: List[int]          # rows received from each rank
    # (local expert, source rank) -> rows [begin, end) of recv_x[expert]; the combine send order
    recv_ranges: List[List[Tuple[int, int]]]
    num_topk: int
    device: torch.device            # where the zero-copy combine buffer lives


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.group = ctx.group
        # gloo exchanges CPU tensors only: device tensors take a round trip through host memory.
        self._exchange_on_host = dist.get_backend(self.group) == "gloo"
        self._combine_buffers: Dict[Tuple[int, int, int, str], torch.Tensor] = {}

    # ---- exchange primitives -------------------------------------------------------------------
    # Every collective is started asynchronously and waited for at most EP_COMM_TIMEOUT_S: a peer that
    # died or hangs mid-call ends in EpCommTimeout naming the phase, not in the group's own (30 min) wait.
    def _all_to_all_rows(self, rows: torch.Tensor, send_counts: List[int], recv_counts: List[int],
                         phase: str) -> torch.Tensor:
        """Send rows[sum(send_counts[:r]) : ...] to rank r; receive rank-major. rows: uint8 [n, W]."""
        device = rows.device
        if self._exchange_on_host:
            rows = rows.cpu()
        out = torch.empty(sum(recv_counts), rows.shape[1], dtype=rows.dtype, device=rows.device)
        work = dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=list(recv_counts),
                                      input_split_sizes=list(send_counts), group=self.group, async_op=True)
        wait_for(work, self.ctx.timeout_s, f"{phase} (rows)", self.ctx.agreement)
        return out.to(device)

    def _exchange_counts(self, send_counts: torch.Tensor, phase: str) -> List[int]:
        """send_counts: int [R] -> what every rank sends to this one, as a host list."""
        counts = send_counts.to(torch.int64).cpu() if self._exchange_on_host else send_counts.to(torch.int64)
        received = torch.empty_like(counts)
        work = dist.all_to_all_single(received, counts.contiguous(), group=self.group, async_op=True)
        wait_for(work, self.ctx.timeout_s, f"{phase} (counts)", self.ctx.agreement)
        return received.tolist()

    # ---- normal mode ---------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        num_ranks = self.ctx.num_ranks
        experts_per_rank = num_experts // num_ranks
        num_tokens_per_expert = _tokens_per_expert(topk_idx, num_experts).to(torch.int32)
        dest_rank = torch.where(topk_idx < 0, num_ranks, topk_idx // experts_per_rank)
        in_rank = torch.zeros(topk_idx.shape[0], num_ranks + 1, dtype=torch.bool, device=topk_idx.device)
        in_rank.scatter_(1, dest_rank, True)
        is_token_in_rank = in_rank[:, :num_ranks].contiguous()
        num_tokens_per_rank = is_token_in_rank.sum(0).to(torch.int32)
        num_tokens_per_rdma_rank = None
        if self.ctx.num_nodes > 1:
            in_node = is_token_in_rank.view(-1, self.ctx.num_nodes, self.ctx.ranks_per_node).any(dim=2)
            num_tokens_per_rdma_rank = in_node.sum(0).to(torch.int32)
        return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank

    def _normal_layout(self, is_token_in_rank: torch.Tensor) -> _NormalLayout:
        # Transposing makes the nonzero() order destination-rank major, token ascending.
        dest, token = torch.nonzero(is_token_in_rank.t(), as_tuple=True)
        send_counts = torch.bincount(dest, minlength=self.ctx.num_ranks)
        recv_counts = self._exchange_counts(send_counts, "dispatch")
        return _NormalLayout(token, send_counts.tolist(), recv_counts, sum(recv_counts))

    def dispatch(self, args: DispatchArgs) -> DispatchOutput:
        x = args.x
        cached = args.handle is not None
        layout = args.handle.state if cached else self._normal_layout(args.is_token_in_rank)
        idx = layout.send_index
        parts = [x[idx]]
        if args.x_scales is not None:
            parts.append(args.x_scales[idx])
        if not cached:
            parts.append(args.topk_idx[idx])
            if args.topk_weights is not None:
                parts.append(args.topk_weights[idx])
        packed, widths = _pack_rows(parts)
        received = _unpack_rows(self._all_to_all_rows(packed, layout.send_counts, layout.recv_counts,
                                                      "cached dispatch" if cached else "dispatch"), widths)

        num_recv = layout.num_recv_tokens
        num_worst = args.handle.num_worst_tokens if cached else args.num_worst_tokens
        if num_worst and num_recv > num_worst:
            raise ValueError(f"rank {self.ctx.rank} received {num_recv} tokens, more than num_worst_tokens="
                             f"{num_worst}; raise num_worst_tokens")
        num_rows = num_worst or num_recv

        def padded(t: torch.Tensor, fill) -> torch.Tensor:
            if num_rows == t.shape[0]:
                return t
            out = torch.full((num_rows, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            out[:t.shape[0]] = t
            return out

        hidden = x.shape[1]
        recv_x = padded(_from_bytes(received.pop(0), x.dtype, [hidden]), 0)
        recv_x_scales = None
        if args.x_scales is not None:
            recv_x_scales = padded(_from_bytes(received.pop(0), torch.float32, [args.x_scales.shape[1]]), 0)
        if cached:
            return DispatchOutput(recv_x, recv_x_scales, None, None, None, args.handle)

        num_ranks, rank = self.ctx.num_ranks, self.ctx.rank
        num_experts = args.num_tokens_per_expert.numel()
        experts_per_rank = num_experts // num_ranks
        num_topk = args.topk_idx.shape[1]
        global_idx = _from_bytes(received.pop(0), torch.int64, [num_topk])
        local_idx = global_idx - rank * experts_per_rank
        is_local = (global_idx >= 0) & (local_idx >= 0) & (local_idx < experts_per_rank)
        recv_topk_idx = torch.where(is_local, local_idx, torch.full_like(local_idx, -1))
        recv_topk_weights = None
        if args.topk_weights is not None:
            weights = _from_bytes(received.pop(0), torch.float32, [num_topk])
            recv_topk_weights = padded(torch.where(is_local, weights, torch.zeros_like(weights)), 0)

        per_expert_list: List[int] = []
        if not num_worst:
            align = args.expert_alignment
            counts = _tokens_per_expert(recv_topk_idx, experts_per_rank).tolist()
            per_expert_list = [(c + align - 1) // align * align for c in counts]
        recv_topk_idx = padded(recv_topk_idx, -1)

        handle = DispatchHandle(buffer_id=self.ctx.buffer_id, backend=self.name, num_tokens=x.shape[0],
                                hidden=hidden, num_recv_rows=num_rows, num_worst_tokens=num_worst,
                                is_token_in_rank=args.is_token_in_rank, state=layout)
        return DispatchOutput(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle)

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor],
                bias: List[torch.Tensor], config: Config):
        layout: _NormalLayout = handle.state
        num_recv = layout.num_recv_tokens
        parts = [x[:num_recv]]
        if topk_weights is not None:
            parts.append(topk_weights[:num_recv])
        packed, widths = _pack_rows(parts)
        # The reverse exchange: rows go back to where they came from, in the order they were sent.
        returned = _unpack_rows(self._all_to_all_rows(packed, layout.recv_counts, layout.send_counts, "combine"),
                                widths)

        hidden = x.shape[1]
        rows = _from_bytes(returned.pop(0), x.dtype, [hidden]).float()
        combined = self._sum_by_destination(rows, layout, handle.num_tokens)
        for b in bias:
            combined += b.float()
        combined_x = combined.to(x.dtype)
        combined_weights = None
        if topk_weights is not None:
            weights = _from_bytes(returned.pop(0), torch.float32, [topk_weights.shape[1]])
            combined_weights = self._sum_by_destination(weights, layout, handle.num_tokens)
        return combined_x, combined_weights

    def _sum_by_destination(self, rows: torch.Tensor, layout: _NormalLayout, num_tokens: int) -> torch.Tensor:
        """float32 sum of each token's returned rows, destination rank ascending (a fixed order)."""
        out = torch.zeros(num_tokens, *rows.shape[1:], dtype=torch.float32, device=rows.device)
        begin = 0
        for count in layout.send_counts:
            # Within one destination each token appears at most once, so index_add_ has no collisions.
            out.index_add_(0, layout.send_index[begin:begin + count], rows[begin:begin + count])
            begin += count
        return out

    # ---- low-latency mode ----------------------------------------------------------------------
    def low_latency_dispatch(self, args: LowLatencyDispatchArgs) -> LowLatencyDispatchOutput:
        x, topk_idx = args.x, args.topk_idx
        num_ranks, rank = self.ctx.num_ranks, self.ctx.rank
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        experts_per_rank = args.num_experts // num_ranks
        max_rows = num_ranks * args.num_max_dispatch_tokens_per_rank
        device = x.device

        # One row per valid (token, slot), ordered by (global expert, token, slot): destination-rank
        # major, then local expert, then token -- the order receivers lay rows out in.
        flat_idx = topk_idx.reshape(-1)
        flat_slots = torch.nonzero(flat_idx >= 0, as_tuple=True)[0]
        keys = flat_idx[flat_slots] * num_tokens + flat_slots // num_topk
        send_flat_slots = flat_slots[torch.sort(keys, stable=True).indices]
        send_tokens = send_flat_slots // num_topk
        send_experts = flat_idx[send_flat_slots]
        send_counts = torch.bincount(send_experts // experts_per_rank, minlength=num_ranks)

        if args.use_fp8:
            x_fp8, scales = fp8.per_token_cast_to_fp8(x, round_scale=args.round_scale, use_ue8m0=args.use_ue8m0)
            parts = [x_fp8[send_tokens], scales[send_tokens]]
            recv_x = torch.zeros(experts_per_rank, max_rows, hidden, dtype=torch.float8_e4m3fn, device=device)
            recv_x_scales = fp8.empty_column_major_scales(experts_per_rank, max_rows, scales.shape[1],
                                                          scales.dtype, device)
            recv_x_scales.zero_()
        else:
            parts = [x[send_tokens]]
            recv_x = torch.zeros(experts_per_rank, max_rows, hidden, dtype=x.dtype, device=device)
            recv_x_scales = None
        parts.append(send_experts)
        packed, widths = _pack_rows(parts)
        recv_count = torch.zeros(experts_per_rank, dtype=torch.int32, device=device)
        stats = args.cumulative_local_expert_recv_stats
        layout = _LowLatencyLayout(send_flat_slots, send_counts.tolist(), [], [], num_topk, device)
        handle = LowLatencyHandle(buffer_id=self.ctx.buffer_id, backend=self.name, num_tokens=num_tokens,
                                  hidden=hidden, num_max_dispatch_tokens_per_rank=args.num_max_dispatch_tokens_per_rank,
                                  num_experts=args.num_experts, state=layout)

        # The exchange happens now, in the call every rank agreed on; a hook only unpacks what arrived, so
        # hooks may run in any order on any rank (as the kernels' hooks may).
        layout.recv_counts = self._exchange_counts(send_counts, "low_latency_dispatch")
        received = _unpack_rows(self._all_to_all_rows(packed, layout.send_counts, layout.recv_counts,
                                                      "low_latency_dispatch"), widths)

        def receive() -> None:
            experts = _from_bytes(received[-1], torch.int64, []) - rank * experts_per_rank
            sources = torch.repeat_interleave(torch.arange(num_ranks, device=device),
                                              torch.tensor(layout.recv_counts, device=device))
            # Each source's rows arrive expert-ascending, token-ascending; a stable sort by
            # (expert, source) lays them out expert-major, source-ascending, keeping token order.
            group_key = experts * num_ranks + sources
            order = torch.sort(group_key, stable=True).indices
            group_counts = torch.bincount(group_key, minlength=experts_per_rank * num_ranks)
            group_counts = group_counts.view(experts_per_rank, num_ranks)
            counts = group_counts.sum(1)
            expert_starts = torch.cumsum(counts, 0) - counts
            sorted_experts = experts[order]
            position = torch.arange(order.numel(), device=device) - expert_starts[sorted_experts]
            dest_rows = torch.empty_like(order)
            dest_rows[order] = sorted_experts * max_rows + position
            ends = torch.cumsum(group_counts, 1)
            layout.recv_ranges = [[(int(end - count), int(end)) for end, count in zip(ends_e, counts_e)]
                                  for ends_e, counts_e in zip(ends.tolist(), group_counts.tolist())]

            recv_x.view(-1, hidden)[dest_rows] = _from_bytes(received[0], recv_x.dtype, [hidden])
            if recv_x_scales is not None:
                num_scale_cols = recv_x_scales.shape[2]
                scale_rows = _from_bytes(received[1], recv_x_scales.dtype, [num_scale_cols])
                # index_put_ writes through the column-major view's strides.
                recv_x_scales[dest_rows // max_rows, dest_rows % max_rows] = scale_rows
            recv_count.copy_(counts.to(torch.int32))
            if stats is not None:
                stats.add_(recv_count)

        if args.return_recv_hook:
            return LowLatencyDispatchOutput(recv_x, recv_x_scales, recv_count, handle, receive)
        receive()
        return LowLatencyDispatchOutput(recv_x, recv_x_scales, recv_count, handle, None)

    def low_latency_combine(self, args: LowLatencyCombineArgs):
        handle = args.handle
        layout: _LowLatencyLayout = handle.state
        x = self.get_next_low_latency_combine_buffer(handle) if args.zero_copy else args.x
        experts_per_rank = x.shape[0]
        # Send each (expert, source) range back to its source: source-rank major, expert ascending.
        send_rows = [x[e, begin:end] for s in range(self.ctx.num_ranks) for e in range(experts_per_rank)
                     for begin, end in [layout.recv_ranges[e][s]]]
        packed = _as_bytes(torch.cat(send_rows, dim=0)) if send_rows else _as_bytes(x[0, :0])
        out = args.out if args.out is not None else torch.empty(handle.num_tokens, handle.hidden,
                                                                dtype=torch.bfloat16, device=x.device)
        topk_idx, topk_weights = args.topk_idx, args.topk_weights

        returned = self._all_to_all_rows(packed, layout.recv_counts, layout.send_counts, "low_latency_combine")

        def receive() -> None:
            rows = _from_bytes(returned, x.dtype, [handle.hidden]).float()
            num_tokens, num_topk = topk_idx.shape
            row_of_slot = torch.full((num_tokens * num_topk,), -1, dtype=torch.int64, device=x.device)
            row_of_slot[layout.send_flat_slots] = torch.arange(layout.send_flat_slots.numel(), device=x.device)
            row_of_slot = row_of_slot.view(num_tokens, num_topk)
            acc = torch.zeros(num_tokens, handle.hidden, dtype=torch.float32, device=x.device)
            for k in range(num_topk):
                valid = row_of_slot[:, k] >= 0
                picked = rows[row_of_slot[valid, k]]
                acc[valid] += topk_weights[valid, k, None] * picked
            out.copy_(acc.to(out.dtype))

        if args.return_recv_hook:
            return out, receive
        receive()
        return out, None

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        experts_per_rank = handle.num_experts // self.ctx.num_ranks
        rows = self.ctx.num_ranks * handle.num_max_dispatch_tokens_per_rank
        device = handle.state.device
        key = (experts_per_rank, rows, handle.hidden, str(device))
        if key not in self._combine_buffers:
            self._combine_buffers[key] = torch.zeros(experts_per_rank, rows, handle.hidden, dtype=torch.bfloat16,
                                                     device=device)
        return self._combine_buffers[key]

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        for buf in self._combine_buffers.values():
            buf.zero_()

    def destroy(self) -> None:
        self._combine_buffers.clear()
