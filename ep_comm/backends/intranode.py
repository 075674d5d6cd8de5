"""Intranode backend: dispatch/combine over NVLink between the ranks of one node (CUDA IPC).

Python owns every tensor it returns and passes raw pointers, sizes and the current stream to
`ep_comm._C`; the C++ runtime owns the NVLink buffer (csrc/runtime/ipc_buffer.*), the kernels live
in csrc/kernels/intranode.cu (protocol summary in csrc/kernels/intranode.hpp). The same backend
runs the same kernels on the emulated device (`ep_comm._C_emu`, CPU tensors) when given that
KernelTarget (backends/target.py): every op then ends with a synchronize of the emulated device.

Channels: `Config.num_sms / 2` channels; each is one sender and one receiver block (2 * channels
blocks in all, 768 threads each). A channel owns a contiguous range of this rank's tokens, which
is what fixes the receive order (source rank, then channel, then token).

Ring capacity: `Config.num_max_nvl_chunked_recv_tokens` slots per (source, channel); a round moves
up to half of it. `num_max_nvl_chunked_send_tokens` is not used by these kernels.

Failures: a device-side timeout or a mismatch between ranks is recorded in a host-mapped slot and
raised as RuntimeError (naming rank, phase and peer) at the next host wait or the next call; the
buffer is unusable afterwards on every rank, so all ranks must destroy their Buffers and create
new ones. Every kernel (notify, dispatch, cached dispatch, combine) checks in its start rendezvous
that all ranks launched the same kind of call with the same ring layout (`_signature`), and a rank
that failed earlier (e.g. received more rows than num_worst_tokens) tells its peers there, so they
skip the call instead of timing out. A timeout inside a running kernel is broadcast to every rank
at once (an abort word in each rank's buffer, tagged with the call), so the peers waiting in the
same call stop within microseconds with an error naming the rank that failed and its phase.
`destroy()` must be called by all ranks after their last
communication call (a peer may still be writing into this rank's buffer otherwise); interpreter
exit destroys what is left.
"""
from __future__ import annotations

import atexit
import weakref
import zlib
from dataclasses import dataclass
from typing import List, Optional

import torch

from ep_comm import agreement
from ep_comm.backends.base import Backend, BackendContext, DispatchArgs, DispatchHandle, DispatchOutput
from ep_comm.backends.target import KernelTarget, resolve_target
from ep_comm.config import Config

# Backends still holding a buffer at interpreter exit. atexit runs while CUDA is still alive,
# unlike C++ static destructors, so the buffers are released cleanly there.
_live_backends: "weakref.WeakSet[IntranodeBackend]" = weakref.WeakSet()


def _destroy_all_at_exit() -> None:
    for backend in list(_live_backends):
        try:
            backend.destroy()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(_destroy_all_at_exit)


@dataclass
class _IntranodeState:
    """What a dispatch leaves for combine and cached dispatch (all on the device)."""

    channel_pos: torch.Tensor      # int32 [N, R]: position of token t in the ring to rank r (channel-local)
    send_count: torch.Tensor       # int32 [C, R]: tokens sent to each rank per channel
    recv_start: torch.Tensor       # int32 [R*C + 1]: first received row of (source, channel); last = total
    is_token_in_rank: torch.Tensor  # bool [N, R], contiguous
    num_channels: int
    num_recv_tokens: Optional[int]  # None in num_worst_tokens mode (never read back to the host)


def _signature(kind: str, *values) -> int:
    """Digest of a call's kind and the sizes that fix its ring layout. Every kernel publishes it in
    its start rendezvous and every peer must publish the same, else all report a mismatch naming
    each other and skip the call. Deterministic (crc32 of the text, no hash seeds) and below 2^31:
    the device reserves the top values (kSignaturePeerFailed)."""
    text = kind + ":" + ",".join(str(int(v)) for v in values)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


class IntranodeBackend(Backend):
    name = "intranode"

    def __init__(self, ctx: BackendContext, target: Optional[KernelTarget] = None) -> None:
        """target: the CUDA kernels on ctx.device unless given (e.g. the emulated device)."""
        self.ctx = ctx
        self._target = target = resolve_target(ctx.device, target, "the intranode kernels")
        self._C = target.module
        if ctx.num_nodes != 1:
            raise ValueError(f"the intranode backend serves ranks of one node; this group spans {ctx.num_nodes} "
                             "nodes (use the internode backend)")
        max_ranks = self._C.INTRANODE_MAX_RANKS
        if ctx.num_ranks > max_ranks:
            raise ValueError(f"the intranode backend supports up to {max_ranks} ranks in one NVLink domain, "
                             f"got {ctx.num_ranks}")
        self._device = target.device
        self._buffer = None
        self._destroyed = False
        if ctx.num_nvl_bytes > 0:
            self._buffer = self._open_buffer()
            _live_backends.add(self)

    # ---- setup -----------------------------------------------------------------------------------
    def _open_buffer(self):
        ctx = self.ctx
        buffer = self._C.IntranodeBuffer(ctx.rank, ctx.num_ranks, self._target.device_index, ctx.num_nvl_bytes)
        try:
            # Bounded: a peer that failed before this exchange is named instead of waited for.
            handles = agreement.all_gather_object(buffer.ipc_handle(), ctx, "intranode setup: IPC handles")
            error = None
            try:
                buffer.open_peers(handles)
            except RuntimeError as e:
                error = str(e)
            # Every rank learns whether every rank could map every peer, so all fail together.
            errors: List[Optional[str]] = agreement.all_gather_object(error, ctx, "intranode setup: peers mapped")
        except BaseException:
            buffer.destroy()
            raise
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            buffer.destroy()
            raise RuntimeError("ep_comm intranode buffer setup failed: " + "; ".join(e for _, e in failed))
        return buffer

    def _require_buffer(self, what: str):
        if self._destroyed:
            raise RuntimeError("this ep_comm intranode buffer was destroyed; create a new Buffer")
        if self._buffer is None:
            raise RuntimeError(f"{what} over NVLink needs an NVLink buffer: create the Buffer with num_nvl_bytes > 0 "
                               "(see Config.get_nvl_buffer_size_hint)")
        if self._buffer.is_destroyed:
            raise RuntimeError("this ep_comm intranode buffer was destroyed")
        # No check_error() here: a recorded error is raised only after the next kernel is launched
        # (by the bindings, or by wait_recv_counts after notify), because that kernel's start
        # rendezvous is what tells the peers "this rank failed" so they skip instead of timing out.
        return self._buffer

    def _stream(self) -> int:
        return self._target.stream()

    def _num_channels(self, config: Config) -> int:
        num_channels = config.num_sms // 2
        max_channels = self._C.INTRANODE_MAX_CHANNELS
        if not 1 <= num_channels <= max_channels:
            raise ValueError(f"Config.num_sms={config.num_sms} gives {num_channels} channels; the intranode kernels "
                             f"support 1 to {max_channels}")
        return num_channels

    def _check_fits(self, what: str, num_channels: int, num_slots: int, slot_bytes: int, hidden_bytes: int) -> None:
        """Refuse, before any launch, a call the buffer cannot hold, or one the GPU cannot co-schedule."""
        if 2 * num_channels > self._target.num_sms:
            raise ValueError(f"{what} with {num_channels} channels needs {2 * num_channels} SMs resident at once, "
                             f"but {self._target.description} has {self._target.num_sms}; lower Config.num_sms")
        needed = self._C.intranode_layout_bytes(self.ctx.num_ranks, num_channels, num_slots, slot_bytes)
        if needed > self.ctx.num_nvl_bytes:
            hint = self._C.intranode_buffer_bytes(hidden_bytes, self.ctx.num_ranks, num_channels, num_slots)
            raise RuntimeError(
                f"{what} needs {needed} bytes of NVLink buffer ({self.ctx.num_ranks} ranks, {num_channels} channels, "
                f"{num_slots} ring slots of {slot_bytes} bytes), but the Buffer has num_nvl_bytes="
                f"{self.ctx.num_nvl_bytes}; create it with at least {max(needed, hint)} bytes "
                f"(Config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)) or use a smaller Config")

    # ---- layout ----------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        with self._target.op():
            return self._get_dispatch_layout(topk_idx, num_experts)

    def _get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        num_ranks = self.ctx.num_ranks
        topk = topk_idx.contiguous()
        num_tokens, num_topk = topk.shape
        num_tokens_per_rank = torch.empty(num_ranks, dtype=torch.int32, device=self._device)
        num_tokens_per_expert = torch.empty(num_experts, dtype=torch.int32, device=self._device)
        is_token_in_rank = torch.empty(num_tokens, num_ranks, dtype=torch.bool, device=self._device)
        self._C.get_dispatch_layout(_ptr(topk), num_tokens, num_topk, num_ranks, num_experts, num_ranks,
                                    _ptr(num_tokens_per_rank), 0, _ptr(num_tokens_per_expert), _ptr(is_token_in_rank),
                                    self._target.device_index, self._stream())
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank

    # ---- dispatch --------------------------------------------------------------------------------
    def dispatch(self, args: DispatchArgs) -> DispatchOutput:
        with self._target.op():
            return self._dispatch(args)

    def _dispatch(self, args: DispatchArgs) -> DispatchOutput:
        buffer = self._require_buffer("dispatch")
        num_ranks = self.ctx.num_ranks
        timeout_s = self.ctx.timeout_s
        stream = self._stream()
        cached = args.handle is not None
        x = args.x.contiguous()
        num_tokens, hidden = x.shape
        hidden_bytes = hidden * x.element_size()
        scales = args.x_scales.contiguous() if args.x_scales is not None else None
        num_scales = scales.shape[1] if scales is not None else 0
        num_slots = args.config.num_max_nvl_chunked_recv_tokens

        if cached:
            handle = args.handle
            state: _IntranodeState = self._state_of(handle)
            num_channels = state.num_channels
            topk_idx = topk_weights = None
            num_topk = 0
            with_weights = False
            num_local_experts = 0
            num_rows = handle.num_recv_rows
            num_worst = handle.num_worst_tokens
            per_expert_list = None
        else:
            num_channels = self._num_channels(args.config)
            topk_idx = args.topk_idx.contiguous()
            topk_weights = args.topk_weights.contiguous() if args.topk_weights is not None else None
            num_topk = topk_idx.shape[1]
            with_weights = topk_weights is not None
            num_experts = args.num_tokens_per_expert.numel()
            num_local_experts = num_experts // num_ranks
            max_local = self._C.INTRANODE_MAX_LOCAL_EXPERTS
            if num_local_experts > max_local:
                raise ValueError(f"the intranode kernels support up to {max_local} experts per rank, got "
                                 f"{num_local_experts} ({num_experts} experts over {num_ranks} ranks)")
            num_worst = args.num_worst_tokens
            if num_worst == 0 and self._target.is_capturing():
                # The host would wait for receive counts that a capture never produces.
                raise RuntimeError("dispatch without num_worst_tokens reads the receive counts on the host, so it "
                                   "cannot be captured in a CUDA graph: pass num_worst_tokens > 0, or capture a "
                                   "cached dispatch (handle=...)")

        slot_bytes = self._C.intranode_dispatch_slot_bytes(hidden_bytes, num_scales, num_topk)
        self._check_fits("dispatch", num_channels, num_slots, slot_bytes, max(hidden_bytes, hidden * 2))
        layout_fields = (hidden_bytes, num_scales, num_topk, with_weights, num_channels, num_slots, num_local_experts)

        if not cached:
            is_token_in_rank = args.is_token_in_rank.contiguous()
            num_tokens_per_expert = args.num_tokens_per_expert.contiguous()
            state = _IntranodeState(
                channel_pos=torch.empty(num_tokens, num_ranks, dtype=torch.int32, device=self._device),
                send_count=torch.empty(num_channels, num_ranks, dtype=torch.int32, device=self._device),
                recv_start=torch.empty(num_ranks * num_channels + 1, dtype=torch.int32, device=self._device),
                is_token_in_rank=is_token_in_rank, num_channels=num_channels, num_recv_tokens=None)
            report_to_host = num_worst == 0
            buffer.notify(_ptr(is_token_in_rank), _ptr(num_tokens_per_expert), num_tokens, num_channels,
                          num_local_experts, args.expert_alignment, num_worst, _signature("notify", *layout_fields),
                          report_to_host, num_slots, slot_bytes, _ptr(state.channel_pos), _ptr(state.send_count),
                          _ptr(state.recv_start), timeout_s, stream)
            if report_to_host:
                num_recv, per_expert_list = buffer.wait_recv_counts(num_local_experts, timeout_s)
                state.num_recv_tokens = num_recv
                num_rows = num_recv
            else:
                num_rows = num_worst
                per_expert_list = []

        recv_x = torch.empty(num_rows, hidden, dtype=x.dtype, device=self._device)
        recv_x_scales = (torch.empty(num_rows, num_scales, dtype=torch.float32, device=self._device)
                         if scales is not None else None)
        recv_topk_idx = (torch.empty(num_rows, num_topk, dtype=torch.int64, device=self._device)
                         if topk_idx is not None else None)
        recv_topk_weights = (torch.empty(num_rows, num_topk, dtype=torch.float32, device=self._device)
                             if topk_weights is not None else None)
        buffer.dispatch(_ptr(x), _ptr(scales), _ptr(topk_idx), _ptr(topk_weights), num_tokens, hidden_bytes, num_scales,
                        num_topk, num_local_experts, _ptr(state.is_token_in_rank), _ptr(state.channel_pos),
                        _ptr(state.send_count), _ptr(state.recv_start), num_channels, num_slots, _ptr(recv_x),
                        _ptr(recv_x_scales), _ptr(recv_topk_idx), _ptr(recv_topk_weights), num_rows,
                        _signature("cached-dispatch" if cached else "dispatch", *layout_fields), timeout_s, stream)

        if cached:
            return DispatchOutput(recv_x, recv_x_scales, None, None, None, args.handle)
        handle = DispatchHandle(buffer_id=self.ctx.buffer_id, backend=self.name, num_tokens=num_tokens, hidden=hidden,
                                num_recv_rows=num_rows, num_worst_tokens=num_worst,
                                is_token_in_rank=args.is_token_in_rank, state=state)
        return DispatchOutput(recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, per_expert_list, handle)

    # ---- combine ---------------------------------------------------------------------------------
    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor],
                bias: List[torch.Tensor], config: Config):
        with self._target.op():
            return self._combine(x, handle, topk_weights, bias, config)

    def _combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor],
                 bias: List[torch.Tensor], config: Config):
        buffer = self._require_buffer("combine")
        state: _IntranodeState = self._state_of(handle)
        config = config or Config()
        num_channels = state.num_channels  # the dispatch's token split, whatever this config says
        num_slots = config.num_max_nvl_chunked_recv_tokens
        x = x.contiguous()
        hidden = x.shape[1]
        weights = topk_weights.contiguous() if topk_weights is not None else None
        num_topk = weights.shape[1] if weights is not None else 0
        if num_topk > self._C.INTRANODE_MAX_TOPK:
            raise ValueError(f"topk_weights has {num_topk} columns; at most {self._C.INTRANODE_MAX_TOPK} are supported")
        slot_bytes = self._C.intranode_combine_slot_bytes(hidden * 2, num_topk)
        self._check_fits("combine", num_channels, num_slots, slot_bytes, hidden * 2)

        biases = [b.contiguous() for b in bias]
        bias0 = biases[0] if len(biases) > 0 else None
        bias1 = biases[1] if len(biases) > 1 else None
        num_tokens = handle.num_tokens
        combined_x = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=self._device)
        combined_weights = (torch.empty(num_tokens, num_topk, dtype=torch.float32, device=self._device)
                            if weights is not None else None)
        buffer.combine(_ptr(x), _ptr(weights), _ptr(bias0), _ptr(bias1), num_tokens, hidden, num_topk,
                       _ptr(state.is_token_in_rank), _ptr(state.channel_pos), _ptr(state.send_count),
                       _ptr(state.recv_start), num_channels, num_slots, _ptr(combined_x), _ptr(combined_weights),
                       _signature("combine", hidden * 2, num_topk, num_channels, num_slots), self.ctx.timeout_s,
                       self._stream())
        return combined_x, combined_weights

    # ---- teardown --------------------------------------------------------------------------------
    def check_errors(self) -> None:
        """Raise the first device error recorded so far (after a sync, this covers finished kernels)."""
        if self._buffer is not None and not self._buffer.is_destroyed:
            self._buffer.check_error()

    def destroy(self) -> None:
        """Release the NVLink buffer (idempotent). Synchronises this rank's device first."""
        self._destroyed = True
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            buffer.destroy()
        _live_backends.discard(self)
