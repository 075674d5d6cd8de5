"""DeepEP V2's `ElasticBuffer` and `EPHandle` on ep_comm's normal mode.

One ElasticBuffer call maps onto ep_comm.Buffer calls:
- dispatch (no handle): get_dispatch_layout + dispatch; `do_cpu_sync=False` becomes
  `num_worst_tokens = num_ranks * num_max_tokens_per_rank` (no host wait for counts; rows past the
  received ones are zero, their top-k ids -1);
- dispatch with a cached handle: a cached dispatch (no layout, no host sync);
- `do_expand=True`: the received rows are then laid out once per (token, local expert), each
  expert's rows contiguous (source rank, then token order) and padded with zero rows to
  `expert_alignment`; combine first sums a token's expanded rows back (float32, rounded to bf16)
  and then combines across ranks;
- combine: combine with the handle.
`psum_num_recv_tokens_per_scaleup_rank` comes from one extra cached dispatch of a small marker per
source rank, so it is known on the device without a host sync. The logical domain is flat: one
scale-out rank, `num_ranks` scale-up ranks. Engram, pipeline-parallel send/recv and AGRS are not
provided (they raise NotImplementedError).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ep_comm.deep_ep.utils import EventHandle, EventOverlap, plain_event

_ALIGNMENT_BYTES = 2 * 1024 * 1024  # DeepEP V2 sizes buffers in 2 MiB steps
_MARKER_COLUMNS = 8                  # bf16 columns of the source marker: 16 bytes, one aligned row


def _ceil_to(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class EPHandle:
    """The routing of one ElasticBuffer.dispatch: reused by combine and by cached dispatch.

    Same public attributes as DeepEP V2's EPHandle (the kernel-specific ones, recv_src_metadata,
    dst_buffer_slot_idx, token_metadata_at_forward and channel_linked_list, are None)."""

    def __init__(self, inner, do_expand: bool, num_experts: int, expert_alignment: int, num_max_tokens_per_rank: int,
                 num_sms: int, topk_idx: torch.Tensor, num_recv_tokens: int, num_expanded_tokens: int,
                 num_recv_tokens_per_expert_list: List[int], psum_num_recv_tokens_per_scaleup_rank: torch.Tensor,
                 psum_num_recv_tokens_per_expert: torch.Tensor,
                 num_unaligned_recv_tokens_per_expert: Optional[torch.Tensor],
                 expand_rows: Optional[torch.Tensor], expand_slots: Optional[torch.Tensor]) -> None:
        self.do_expand = do_expand
        self.num_experts = num_experts
        self.expert_alignment = expert_alignment
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_sms = num_sms
        self.topk_idx = topk_idx
        self.num_recv_tokens = num_recv_tokens
        self.num_expanded_tokens = num_expanded_tokens
        self.num_recv_tokens_per_expert_list = num_recv_tokens_per_expert_list
        self.psum_num_recv_tokens_per_scaleup_rank = psum_num_recv_tokens_per_scaleup_rank
        self.psum_num_recv_tokens_per_expert = psum_num_recv_tokens_per_expert
        self.num_unaligned_recv_tokens_per_expert = num_unaligned_recv_tokens_per_expert
        self.recv_src_metadata = None
        self.dst_buffer_slot_idx = None
        self.token_metadata_at_forward = None
        self.channel_linked_list = None
        self._inner = inner                  # the ep_comm DispatchHandle
        self._expand_rows = expand_rows      # int64 [expanded rows]: the received row of each, -1 = padding
        self._expand_slots = expand_slots    # int64 [expanded rows]: its top-k slot


def _merged_event(previous_event, before_epilogue) -> Optional[EventOverlap]:
    """One previous_event for ep_comm: V2's `previous_event_before_epilogue` only orders the
    epilogue, ep_comm's calls have none, so the whole call waits for both (stronger, still correct)."""
    first = plain_event(previous_event)
    second = plain_event(before_epilogue)
    if second is None or second.event is None:
        return first
    if first is not None and first.event is not None:
        torch.cuda.current_stream().wait_event(first.event)
    torch.cuda.current_stream().wait_event(second.event)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream())
    return EventOverlap(event)


class ElasticBuffer:
    """DeepEP V2's unified buffer (dispatch/combine), on an ep_comm (deep_ep drop-in) Buffer."""

    def __init__(self, group: dist.ProcessGroup, num_bytes: Optional[int] = None, num_cpu_bytes: int = 0,
                 num_max_tokens_per_rank: int = 0, hidden: int = 0, num_topk: int = 0,
                 use_fp8_dispatch: bool = False, deterministic: bool = False, allow_hybrid_mode: bool = True,
                 allow_multiple_reduction: bool = True, prefer_overlap_with_compute: bool = True, sl_idx: int = 3,
                 num_allocated_qps: int = 0, num_cpu_timeout_secs: int = 300, num_gpu_timeout_secs: int = 100,
                 explicitly_destroy: bool = False, *, backend: Optional[str] = None) -> None:
        from ep_comm.deep_ep import Buffer
        if num_cpu_bytes:
            raise NotImplementedError("ElasticBuffer(num_cpu_bytes > 0): ep_comm provides no CPU buffers (Engram)")
        self.group = group
        self.rank_idx = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.deterministic = deterministic  # ep_comm's row order is fixed, so outputs are deterministic anyway
        if num_bytes is None:
            num_bytes = ElasticBuffer.get_buffer_size_hint(group, num_max_tokens_per_rank, hidden, num_topk,
                                                           use_fp8_dispatch, allow_hybrid_mode,
                                                           allow_multiple_reduction)
        self.num_bytes = num_bytes
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_allocated_qps = num_allocated_qps or 17
        self.explicitly_destroy = explicitly_destroy
        # One size for both legs: ep_comm uses the NVLink buffer inside a node and the RDMA one across
        # nodes, which the configs' RDMA hint (0 within one node) tells.
        num_rdma_bytes = num_bytes if Buffer.get_dispatch_config(self.num_ranks).get_rdma_buffer_size_hint(
            max(hidden, 1) * 2, self.num_ranks) > 0 else 0
        self._buffer = Buffer(group, num_nvl_bytes=num_bytes, num_rdma_bytes=num_rdma_bytes,
                              explicitly_destroy=explicitly_destroy, backend=backend)
        self.num_scaleout_ranks, self.num_scaleup_ranks = self.get_logical_domain_size()
        self.scaleout_rank_idx = self.rank_idx // self.num_scaleup_ranks
        self.scaleup_rank_idx = self.rank_idx % self.num_scaleup_ranks
        self.num_rdma_ranks, self.num_nvlink_ranks = self.get_physical_domain_size()

    # ---- sizes and settings ----------------------------------------------------------------------
    @staticmethod
    def get_buffer_size_hint(group: dist.ProcessGroup, num_max_tokens_per_rank: int, hidden: int, num_topk: int = 0,
                             use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        """Bytes for ep_comm's normal-mode buffer at this hidden size (2 MiB-aligned; bf16 rows, which
        also cover FP8 rows and their scales)."""
        from ep_comm.deep_ep import Buffer
        num_ranks = dist.get_world_size(group)
        hidden_bytes = max(hidden, 1) * 2
        size = 0
        for config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)):
            size = max(size, config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks),
                       config.get_rdma_buffer_size_hint(hidden_bytes, num_ranks))
        return _ceil_to(max(size, 1), _ALIGNMENT_BYTES)

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0, sm_read_gbs: float = 200,
                                sm_write_gbs: float = 50) -> int:
        """ep_comm's configured SM count (Buffer.num_sms); ep_comm does not model bandwidth."""
        return self._buffer.num_sms

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        return min(num_sms + 1, self.num_allocated_qps)

    @staticmethod
    def capture() -> EventHandle:
        return EventHandle()

    def get_comm_stream(self):
        return self._buffer.get_comm_stream()

    def get_physical_domain_size(self) -> Tuple[int, int]:
        """(nodes, ranks per node)."""
        nodes = self._buffer.get_num_rdma_ranks()
        return nodes, self.num_ranks // nodes

    def get_logical_domain_size(self) -> Tuple[int, int]:
        """(1, num_ranks): ep_comm routes every token directly, without a scale-out/scale-up hierarchy."""
        return 1, self.num_ranks

    def barrier(self, use_comm_stream: bool = True, with_cpu_sync: bool = False, sequential: bool = True) -> None:
        if torch.cuda.is_available() and with_cpu_sync:
            torch.cuda.synchronize()
        dist.barrier(group=self.group)

    def destroy(self) -> None:
        self._buffer.destroy()

    # ---- dispatch / combine -----------------------------------------------------------------------
    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None, num_experts: Optional[int] = None,
                 num_max_tokens_per_rank: Optional[int] = None, expert_alignment: Optional[int] = None,
                 num_sms: int = 0, num_qps: int = 0, previous_event=None, previous_event_before_epilogue=None,
                 async_with_compute_stream: bool = False, allocate_on_comm_stream: bool = False,
                 handle: Optional[EPHandle] = None, do_handle_copy: bool = True, do_cpu_sync: Optional[bool] = None,
                 do_expand: bool = False, do_zero_padding: bool = False, use_tma_aligned_col_major_sf: bool = False):
        """Returns (recv_x, recv_topk_idx, recv_topk_weights, handle, event), as DeepEP V2.

        Non-expanded: recv_x [M, H] (M = received tokens, or num_ranks * num_max_tokens_per_rank
        without CPU sync), recv_topk_idx int64 [M, K] local ids (-1 elsewhere), weights float32 [M, K].
        Expanded: recv_x [rows, H] per local expert, recv_topk_idx None, weights float32 [rows].
        Cached (handle given): (recv_x, None, None, handle, event)."""
        if use_tma_aligned_col_major_sf:
            raise NotImplementedError("use_tma_aligned_col_major_sf=True: ep_comm returns FP8 scales row-major")
        payload = x[0] if isinstance(x, tuple) else x
        buffer = self._buffer
        event = _merged_event(previous_event, previous_event_before_epilogue)
        if allocate_on_comm_stream and event is None:
            event = EventOverlap(EventHandle().event)  # V2 allows it without an event: order after the current stream
        allocate = allocate_on_comm_stream and async_with_compute_stream
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise NotImplementedError("cached ElasticBuffer.dispatch takes neither topk_idx nor topk_weights here")
            if do_cpu_sync:
                raise ValueError("do_cpu_sync=True cannot be used with a cached handle")
            for name, value, cached in (("num_experts", num_experts, handle.num_experts),
                                        ("expert_alignment", expert_alignment, handle.expert_alignment),
                                        ("num_max_tokens_per_rank", num_max_tokens_per_rank,
                                         handle.num_max_tokens_per_rank)):
                if value is not None and value != cached:
                    raise ValueError(f"{name}={value} differs from the cached handle's {cached}")
            recv_x, _, _, _, _, out_event = buffer.dispatch(x, handle=handle._inner, previous_event=event,
                                                            async_finish=async_with_compute_stream,
                                                            allocate_on_comm_stream=allocate)
            if handle.do_expand:
                recv_x = self._expand_rows_of(recv_x, handle)
            return recv_x, None, None, handle, out_event

        if topk_idx is None or num_experts is None:
            raise ValueError("ElasticBuffer.dispatch without a handle needs topk_idx and num_experts")
        num_max_tokens_per_rank = num_max_tokens_per_rank if num_max_tokens_per_rank is not None \
            else self.num_max_tokens_per_rank
        expert_alignment = 1 if expert_alignment is None else expert_alignment
        do_cpu_sync = True if do_cpu_sync is None else do_cpu_sync
        if payload.shape[0] > num_max_tokens_per_rank:
            raise ValueError(f"x has {payload.shape[0]} tokens, more than num_max_tokens_per_rank="
                             f"{num_max_tokens_per_rank}")
        num_worst_tokens = 0 if do_cpu_sync else self.num_ranks * num_max_tokens_per_rank
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(
            topk_idx, num_experts, previous_event=event)
        recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, inner, out_event = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
            expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
            previous_event=event, async_finish=async_with_compute_stream,
            allocate_on_comm_stream=allocate)
        psum_per_rank = self._psum_recv_per_source(payload, inner)
        experts_per_rank = num_experts // self.num_ranks
        unaligned = torch.stack([(recv_topk_idx == e).sum() for e in range(experts_per_rank)]).to(torch.int32) \
            if experts_per_rank else torch.zeros(0, dtype=torch.int32, device=payload.device)
        aligned = (unaligned + expert_alignment - 1) // expert_alignment * expert_alignment
        if cumulative_local_expert_recv_stats is not None:
            cumulative_local_expert_recv_stats.add_(unaligned.to(cumulative_local_expert_recv_stats.dtype))
        num_recv = recv_topk_idx.shape[0] if do_cpu_sync else -1  # V2: "may not be accurate without CPU sync"
        new = EPHandle(inner, do_expand, num_experts, expert_alignment, num_max_tokens_per_rank,
                       num_sms or buffer.num_sms, topk_idx.clone() if do_handle_copy else topk_idx, num_recv, 0,
                       [], psum_per_rank, torch.cumsum(aligned, 0).to(torch.int32), None, None, None)
        if do_cpu_sync:
            new.num_recv_tokens_per_expert_list = [int(c) for c in aligned.tolist()]
        if not do_expand:
            return recv_x, recv_topk_idx, recv_topk_weights, new, out_event

        # Expanded layout: expert e's rows start at the aligned sum of the experts before it.
        starts = torch.cumsum(aligned, 0) - aligned
        new.psum_num_recv_tokens_per_expert = (starts + unaligned).to(torch.int32)
        new.num_unaligned_recv_tokens_per_expert = unaligned
        num_topk = recv_topk_idx.shape[1]
        if do_cpu_sync:
            num_rows = int(aligned.sum())
        else:
            num_rows = self.num_ranks * num_max_tokens_per_rank * min(num_topk, experts_per_rank) \
                + experts_per_rank * (expert_alignment - 1)
        # Where each (received row, local expert) pair goes, computed without a host sync (no
        # data-dependent shapes): pairs that do not exist go to a dump entry past the end.
        device = payload.device
        num_recv_rows = recv_topk_idx.shape[0]
        expert_or_dump = torch.where(recv_topk_idx >= 0, recv_topk_idx, experts_per_rank)
        present = torch.zeros(num_recv_rows, experts_per_rank + 1, dtype=torch.int64, device=device)
        present.scatter_(1, expert_or_dump, 1)
        slot_of = torch.zeros(num_recv_rows, experts_per_rank + 1, dtype=torch.int64, device=device)
        slot_of.scatter_(1, expert_or_dump, torch.arange(num_topk, device=device).expand(num_recv_rows, num_topk))
        present, slot_of = present[:, :experts_per_rank], slot_of[:, :experts_per_rank]
        target = starts.to(torch.int64).unsqueeze(0) + torch.cumsum(present, 0) - 1
        target = torch.where(present > 0, target, num_rows).reshape(-1)
        rows = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=device)
        slots = torch.zeros(num_rows + 1, dtype=torch.int64, device=device)
        row_ids = torch.arange(num_recv_rows, device=device).unsqueeze(1).expand(num_recv_rows, experts_per_rank)
        rows.scatter_(0, target, row_ids.reshape(-1))
        slots.scatter_(0, target, slot_of.reshape(-1))
        rows[num_rows] = -1
        rows, slots = rows[:num_rows], slots[:num_rows]
        new._expand_rows, new._expand_slots = rows, slots
        new.num_expanded_tokens = num_rows
        expanded_weights = None
        if recv_topk_weights is not None:
            picked = recv_topk_weights[rows.clamp(min=0), slots]
            expanded_weights = torch.where(rows >= 0, picked, torch.zeros_like(picked))
        return self._expand_rows_of(recv_x, new), None, expanded_weights, new, out_event

    def _psum_recv_per_source(self, payload: torch.Tensor, inner) -> torch.Tensor:
        """int32 [num_ranks]: inclusive prefix sum of the tokens received from each source rank. A
        cached dispatch carries (source rank + 1) in bf16 (exact up to 256, so two base-256 digits);
        padding rows arrive as zeros and count for no source."""
        marker = torch.zeros(payload.shape[0], _MARKER_COLUMNS, dtype=torch.bfloat16, device=payload.device)
        marker[:, 0] = (self.rank_idx + 1) % 256
        marker[:, 1] = (self.rank_idx + 1) // 256
        recv_marker, *_ = self._buffer.dispatch(marker, handle=inner)
        source = recv_marker[:, 0].long() + 256 * recv_marker[:, 1].long() - 1
        counts = (source.unsqueeze(1) == torch.arange(self.num_ranks, device=source.device)).sum(0)
        return torch.cumsum(counts, 0).to(torch.int32)

    @staticmethod
    def _expand_rows_of(recv_x, handle: EPHandle):
        """The expanded rows of a non-expanded receive: row r is recv_x[handle._expand_rows[r]], zero for padding."""
        rows = handle._expand_rows
        valid = (rows >= 0).unsqueeze(1)

        def pick(t: torch.Tensor) -> torch.Tensor:
            picked = t[rows.clamp(min=0)]
            return torch.where(valid, picked, torch.zeros_like(picked))

        if isinstance(recv_x, tuple):
            return pick(recv_x[0].view(torch.uint8)).view(recv_x[0].dtype), pick(recv_x[1])
        return pick(recv_x)

    def combine(self, x: torch.Tensor, handle: EPHandle, topk_weights: Optional[torch.Tensor] = None,
                bias=None, num_sms: int = 0, num_qps: int = 0, previous_event=None,
                previous_event_before_epilogue=None, async_with_compute_stream: bool = False,
                allocate_on_comm_stream: bool = False):
        """Returns (combined_x bf16 [N, H], combined_topk_weights float32 [N, K] | None, event).
        x: bf16, one row per row dispatch returned; topk_weights [M, K], or [rows] when expanded."""
        event = _merged_event(previous_event, previous_event_before_epilogue)
        if allocate_on_comm_stream and event is None:
            event = EventOverlap(EventHandle().event)
        if handle.do_expand:
            rows, slots = handle._expand_rows, handle._expand_slots
            num_recv_rows = handle._inner.num_recv_rows
            row_or_dump = torch.where(rows >= 0, rows, num_recv_rows)  # padding rows go to a dump row
            reduced = torch.zeros(num_recv_rows + 1, x.shape[1], dtype=torch.float32, device=x.device)
            reduced.index_add_(0, row_or_dump, x.float())
            x = reduced[:num_recv_rows].to(torch.bfloat16)
            if topk_weights is not None:
                per_slot = torch.zeros(num_recv_rows + 1, handle.topk_idx.shape[1], dtype=torch.float32,
                                       device=x.device)
                per_slot.index_put_((row_or_dump, slots), topk_weights.reshape(-1).float(), accumulate=True)
                topk_weights = per_slot[:num_recv_rows]
        return self._buffer.combine(x, handle._inner, topk_weights=topk_weights, bias=bias, previous_event=event,
                                    async_finish=async_with_compute_stream,
                                    allocate_on_comm_stream=allocate_on_comm_stream and async_with_compute_stream)

    # ---- V2 features ep_comm does not provide -----------------------------------------------------
    def _not_provided(self, *args, **kwargs):
        raise NotImplementedError("ep_comm's ElasticBuffer provides dispatch and combine only "
                                  "(no Engram, pipeline-parallel send/recv or all-gather/reduce-scatter)")

    engram_write = engram_fetch = pp_set_config = pp_send = pp_recv = _not_provided
    create_agrs_session = destroy_agrs_session = agrs_new_session = agrs_set_config = _not_provided
    agrs_get_inplace_tensor = all_gather = _not_provided
