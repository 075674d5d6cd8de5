"""Low-latency mode on NVSHMEM: the Python half of csrc/kernels/low_latency.cu.

This module allocates outputs with torch, passes raw pointers and the current stream to
``ep_comm._C.LowLatencyRuntime``, and owns NVSHMEM's lifetime for one Buffer. Protocol, buffer
layout and the reasoning behind them: docs/low_latency.md.

Rules it keeps so that calls can be captured in a CUDA graph and replayed:
  * no host synchronisation and no host-side state that changes per call: the double-buffer
    parity is an epoch counter in device memory, advanced by the kernels themselves;
  * every tensor a kernel touches is allocated with torch inside the call (a graph's private pool
    during capture) or is the symmetric buffer itself;
  * device errors (timeouts) are read from a host-mapped slot, never by synchronising: at the start
    of every call, in every hook, and in ``check_errors()`` (``Buffer.check_errors()``).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ep_comm import agreement
from ep_comm.backends import nvshmem
from ep_comm.backends.base import (Backend, BackendContext, LowLatencyCombineArgs, LowLatencyDispatchArgs,
                                   LowLatencyDispatchOutput, LowLatencyHandle, destroy_at_exit)
from ep_comm.backends.target import KernelTarget, resolve_target

_FP8_BLOCK = 128
_UE8M0_BLOCK = 512


@dataclass
class _LowLatencyLayout:
    """What a dispatch leaves for its combine (all device tensors, filled by the kernels)."""

    token_slot: torch.Tensor    # int32 [N, K]: slot of (token, k) at its expert, -1 for none
    send_count: torch.Tensor    # int32 [E]: rows this rank sent to each expert
    recv_layout: torch.Tensor   # int32 [E_local, R, 2]: (first row, rows) of each source in recv_x
    num_topk: int
    use_fp8: bool


class _DeviceMemory:
    """Exposes raw device memory through __cuda_array_interface__ so torch can wrap it (no copy)."""

    def __init__(self, ptr: int, num_bytes: int, owner: object) -> None:
        self._owner = owner  # keeps the runtime object referenced while the view lives
        self.__cuda_array_interface__ = {"shape": (num_bytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}




class LowLatencyBackend(Backend):
    """Low-latency dispatch/combine for one Buffer (collective construction and destroy)."""

    name = "low_latency"
    collective_destroy = True

    def __init__(self, ctx: BackendContext, target: Optional[KernelTarget] = None) -> None:
        """target: the CUDA kernels on ctx.device unless given (e.g. the emulated device)."""
        self.ctx = ctx
        self._target = target = resolve_target(ctx.device, target, "the low-latency kernels")
        self._C = target.module
        if ctx.num_rdma_bytes <= 0:
            raise ValueError("low_latency_mode=True needs num_rdma_bytes > 0; size it with "
                             "Buffer.get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, "
                             "num_ranks, num_experts)")
        self.device = target.device
        self._destroyed = False
        self._sizes: Optional[Tuple[int, int, int]] = None   # (T, H, E) the buffer is laid out for
        self._combine_views: Dict[Tuple[int, int, int], torch.Tensor] = {}
        self._runtime = None
        # Host-side sequence numbers, for validation only (the kernels keep their own epoch on the
        # device): ops whose receive hook has not been called yet.
        self._op_seq = 0
        self._pending_receives: set = set()

        nvshmem.acquire(ctx, self._C, target.device_index)
        try:
            with self._target.on_device():
                self._runtime = self._C.LowLatencyRuntime(ctx.num_rdma_bytes, ctx.rank, ctx.num_ranks,
                                                          ctx.allow_nvlink_for_low_latency_mode, ctx.timeout_s)
        except BaseException:
            self._C.nvshmem_release()
            raise
        # Peers write into this rank's buffer as soon as they run their first op: only after every
        # rank zeroed its buffer (the runtime's constructor synchronises) may anyone start.
        agreement.barrier(ctx, "low-latency setup: buffers zeroed")
        destroy_at_exit(self, ctx.timeout_s)

    # ---- NVSHMEM lifetime ------------------------------------------------------------------------
    def destroy(self) -> None:
        """Collective (all ranks together) and idempotent: free the symmetric buffer and release NVSHMEM."""
        if self._destroyed:
            return
        self._destroyed = True
        self._combine_views.clear()
        if self._runtime is None:
            return
        with self._target.on_device():
            self._synchronize()
            self._runtime.destroy()
        self._C.nvshmem_release()

    # ---- checks --------------------------------------------------------------------------------
    def check_errors(self) -> None:
        """Raise RuntimeError for the first device error (e.g. a timeout naming rank and phase).

        Reads a host-mapped slot; it does not synchronise, so it sees errors of kernels that have
        already run. After an error the buffer's state is undefined: call clean_low_latency_buffer
        on all ranks (which also clears the error) or create a new Buffer.
        """
        if self._destroyed:
            raise RuntimeError("this low-latency buffer was destroyed")
        if self._runtime.has_error():
            try:
                self._runtime.check_error()
            except RuntimeError as e:
                why = ""
                if "invalid input" in str(e):
                    why = (" (topk_idx held an expert id outside [-1, num_experts), or named one expert twice in a "
                           "token; low-latency mode checks ids on the device)")
                raise RuntimeError(f"{e}{why}. The low-latency buffer is unusable until clean_low_latency_buffer() "
                                   "runs on all ranks") from None

    def _fix_sizes(self, num_max_tokens: int, hidden: int, num_experts: int) -> None:
        """The buffer is laid out for one (T, H, E) at a time; check it fits and did not change."""
        sizes = (num_max_tokens, hidden, num_experts)
        if self._sizes == sizes:
            return
        needed = int(self._C.low_latency_buffer_bytes(num_max_tokens, hidden, self.ctx.num_ranks, num_experts))
        if needed > self.ctx.num_rdma_bytes:
            raise ValueError(f"low-latency mode with num_max_dispatch_tokens_per_rank={num_max_tokens}, hidden={hidden}, "
                             f"num_experts={num_experts} over {self.ctx.num_ranks} ranks needs num_rdma_bytes >= "
                             f"{needed} (Buffer.get_low_latency_rdma_size_hint), but this Buffer has "
                             f"{self.ctx.num_rdma_bytes}")
        if self._sizes is not None:
            raise ValueError(f"this low-latency buffer is laid out for (num_max_dispatch_tokens_per_rank, hidden, "
                             f"num_experts)={self._sizes}, got {sizes}; call clean_low_latency_buffer{sizes} on all "
                             "ranks before changing sizes")
        self._sizes = sizes

    def _send(self, launch: Callable[[], None], return_recv_hook: bool) -> int:
        """Launches an op's send kernel and returns the op's sequence number; refuses an op that would
        wait forever for its own rank.

        Two ops in a row use the two halves of the buffer; op n reuses op n-2's half and its send
        waits until every rank (this one included) received op n-2. If op n-2's hook was not called
        yet, that wait could never end. The host numbers ops as the device does: only a launched send
        advances the count (the last block of every send kernel advances the device's), so a launch
        that raised leaves both where they were.
        """
        seq = self._op_seq
        if seq - 2 in self._pending_receives:
            raise RuntimeError("the receive hook of the low-latency call before the previous one has not been called; "
                               "at most two low-latency calls may await their hooks (the buffer has two halves). "
                               "Call that hook, or, if it is lost, clean_low_latency_buffer() on all ranks")
        launch()
        self._op_seq = seq + 1
        if return_recv_hook:
            self._pending_receives.add(seq)
        if self._target.emulated:
            # CPU tensors have no stream to order the caller's next use of the inputs after the kernel.
            self._target.after_op()
        return seq

    def _end_op(self, seq: int) -> None:
        self._pending_receives.discard(seq)

    def _synchronize(self) -> None:
        """Waits for this rank's device (raises on the emulator if it faulted)."""
        if self._target.emulated:
            self._target.after_op()
        else:
            torch.cuda.synchronize(self.device)

    # ---- dispatch ------------------------------------------------------------------------------
    def low_latency_dispatch(self, args: LowLatencyDispatchArgs) -> LowLatencyDispatchOutput:
        self.check_errors()
        ctx = self.ctx
        x = args.x.contiguous()
        topk_idx = args.topk_idx.contiguous()
        num_tokens, hidden = x.shape
        num_topk = topk_idx.shape[1]
        num_max_tokens = args.num_max_dispatch_tokens_per_rank
        num_experts = args.num_experts
        num_ranks = ctx.num_ranks
        experts_per_rank = num_experts // num_ranks
        rows = num_ranks * num_max_tokens
        self._fix_sizes(num_max_tokens, hidden, num_experts)

        device = x.device
        i32 = dict(dtype=torch.int32, device=device)
        token_slot = torch.empty(num_tokens, num_topk, **i32)
        send_count = torch.empty(num_experts, **i32)
        call_epoch = torch.empty(1, dtype=torch.int64, device=device)
        recv_count = torch.empty(experts_per_rank, **i32)
        recv_layout = torch.empty(experts_per_rank, num_ranks, 2, **i32)
        recv_scales = None
        if args.use_fp8:
            recv_x = torch.empty(experts_per_rank, rows, hidden, dtype=torch.float8_e4m3fn, device=device)
            # Column-major scales: allocated [E_local, S, R*T], returned as the [E_local, R*T, S] view.
            if args.use_ue8m0:
                recv_scales = torch.empty(experts_per_rank, hidden // _UE8M0_BLOCK, rows, **i32).transpose(1, 2)
            else:
                recv_scales = torch.empty(experts_per_rank, hidden // _FP8_BLOCK, rows, dtype=torch.float32,
                                          device=device).transpose(1, 2)
        else:
            recv_x = torch.empty(experts_per_rank, rows, hidden, dtype=torch.bfloat16, device=device)
        stats = args.cumulative_local_expert_recv_stats

        send_stream = self._current_stream()
        seq = self._send(lambda: self._runtime.dispatch_send(
            num_max_tokens, hidden, num_experts, x.data_ptr(), topk_idx.data_ptr(), num_tokens, num_topk,
            args.use_fp8, args.round_scale, token_slot.data_ptr(), send_count.data_ptr(), call_epoch.data_ptr(),
            self._stream_handle(send_stream)), args.return_recv_hook)

        def receive() -> None:
            self.check_errors()
            self._end_op(seq)
            stream = self._stream_after(send_stream, [call_epoch, recv_x, recv_scales, recv_count, recv_layout,
                                                      stats])
            self._runtime.dispatch_recv(num_max_tokens, hidden, num_experts, call_epoch.data_ptr(), args.use_fp8,
                                        args.use_ue8m0, recv_x.data_ptr(),
                                        recv_scales.data_ptr() if recv_scales is not None else 0,
                                        recv_count.data_ptr(), recv_layout.data_ptr(),
                                        stats.data_ptr() if stats is not None else 0, self._stream_handle(stream))
            if self._target.emulated:
                self._target.after_op()

        handle = LowLatencyHandle(buffer_id=ctx.buffer_id, backend=self.name, num_tokens=num_tokens, hidden=hidden,
                                  num_max_dispatch_tokens_per_rank=num_max_tokens, num_experts=num_experts,
                                  state=_LowLatencyLayout(token_slot, send_count, recv_layout, num_topk, args.use_fp8))
        if args.return_recv_hook:
            return LowLatencyDispatchOutput(recv_x, recv_scales, recv_count, handle, _hook(receive))
        receive()
        return LowLatencyDispatchOutput(recv_x, recv_scales, recv_count, handle, None)

    # ---- combine -------------------------------------------------------------------------------
    def low_latency_combine(self, args: LowLatencyCombineArgs):
        self.check_errors()
        handle = args.handle
        layout: _LowLatencyLayout = handle.state
        num_max_tokens, hidden, num_experts = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        self._fix_sizes(num_max_tokens, hidden, num_experts)
        topk_idx = args.topk_idx.contiguous()
        topk_weights = args.topk_weights.contiguous()
        num_tokens, num_topk = topk_idx.shape
        if num_topk != layout.num_topk:
            raise ValueError(f"topk_idx has {num_topk} slots per token, but the dispatch that made this handle had "
                             f"{layout.num_topk}")
        x = args.x if args.zero_copy else args.x.contiguous()
        device = topk_idx.device
        out = args.out
        target = out if out is not None and out.is_contiguous() else torch.empty(num_tokens, hidden,
                                                                                   dtype=torch.bfloat16, device=device)
        call_epoch = torch.empty(1, dtype=torch.int64, device=device)

        send_stream = self._current_stream()
        seq = self._send(lambda: self._runtime.combine_send(
            num_max_tokens, hidden, num_experts, x.data_ptr(), bool(args.zero_copy), layout.recv_layout.data_ptr(),
            call_epoch.data_ptr(), self._stream_handle(send_stream)), args.return_recv_hook)

        def receive() -> None:
            self.check_errors()
            self._end_op(seq)
            stream = self._stream_after(send_stream, [call_epoch, topk_idx, topk_weights, layout.token_slot,
                                                      layout.send_count, target])
            self._runtime.combine_recv(num_max_tokens, hidden, num_experts, call_epoch.data_ptr(),
                                       topk_idx.data_ptr(), topk_weights.data_ptr(), layout.token_slot.data_ptr(),
                                       layout.send_count.data_ptr(), num_tokens, num_topk, target.data_ptr(),
                                       self._stream_handle(stream))
            if self._target.emulated:
                self._target.after_op()
            if out is not None and target is not out:
                out.copy_(target)

        result = out if out is not None else target
        if args.return_recv_hook:
            return result, _hook(receive)
        receive()
        return result, None

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """bf16 [E_local, R*T, H] view of the symmetric buffer that combine(zero_copy=True) sends from.

        Not double-buffered: every combine finishes reading it before its send kernel ends, so the
        same view serves every call. It stays valid until destroy().
        """
        if self._destroyed:
            raise RuntimeError("this low-latency buffer was destroyed")
        key = (handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        view = self._combine_views.get(key)
        if view is None:
            num_max_tokens, hidden, num_experts = key
            self._fix_sizes(num_max_tokens, hidden, num_experts)
            offsets = self._runtime.layout(num_max_tokens, hidden, num_experts)
            experts_per_rank = num_experts // self.ctx.num_ranks
            rows = self.ctx.num_ranks * num_max_tokens
            num_bytes = experts_per_rank * rows * hidden * 2
            address = self._runtime.buffer_ptr + offsets["combine_staging_offset"]
            if self._target.emulated:
                # Emulated device memory is host memory: a CPU tensor over it (the ctypes array holds
                # the address; the runtime outlives the view through _combine_views).
                raw = torch.frombuffer((ctypes.c_uint8 * num_bytes).from_address(address), dtype=torch.uint8)
            else:
                raw = torch.as_tensor(_DeviceMemory(address, num_bytes, self._runtime), device=self.device)
            view = raw.view(torch.bfloat16).view(experts_per_rank, rows, hidden)
            self._combine_views[key] = view
        return view

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: wait for the device, reset control words, epochs and the error slot; re-lay out
        the buffer for (T, H, E). The way back after a timeout, and before changing sizes."""
        if self._destroyed:
            raise RuntimeError("this low-latency buffer was destroyed")
        needed = int(self._C.low_latency_buffer_bytes(num_max_dispatch_tokens_per_rank, hidden, self.ctx.num_ranks,
                                                      num_experts))
        if needed > self.ctx.num_rdma_bytes:
            raise ValueError(f"clean_low_latency_buffer({num_max_dispatch_tokens_per_rank}, {hidden}, {num_experts}): "
                             f"these sizes need num_rdma_bytes >= {needed}, but this Buffer has "
                             f"{self.ctx.num_rdma_bytes}")
        with self._target.on_device():
            self._synchronize()
            # Receive kernels do not quiet their acks; deliver them before the barrier, so no
            # peer's ack can land after our reset below.
            self._runtime.quiet()
            agreement.barrier(self.ctx, "clean_low_latency_buffer: sends drained")   # nobody still sends into us
            self._runtime.clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)
            agreement.barrier(self.ctx, "clean_low_latency_buffer: cleaned")   # nobody starts before all are clean
        self._sizes = (num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._combine_views.clear()
        self._pending_receives.clear()   # whatever was in flight is abandoned

    # ---- plumbing ------------------------------------------------------------------------------
    def _current_stream(self) -> Optional["torch.cuda.Stream"]:
        """The current CUDA stream (None on the emulator: there every op runs on stream 0 and ends
        with a synchronize)."""
        return None if self._target.emulated else torch.cuda.current_stream(self.device)

    @staticmethod
    def _stream_handle(stream: Optional["torch.cuda.Stream"]) -> int:
        return 0 if stream is None else stream.cuda_stream

    def _stream_after(self, send_stream: Optional["torch.cuda.Stream"], tensors: list) -> Optional["torch.cuda.Stream"]:
        """The stream a receive runs on: the current one, ordered after the send it completes. When
        that is another stream, the tensors the receive touches are marked as used there, so the
        caching allocator does not hand their memory out before the receive is done."""
        if send_stream is None:
            return None
        stream = torch.cuda.current_stream(self.device)
        if stream != send_stream:
            stream.wait_stream(send_stream)
            for t in tensors:
                if t is not None:
                    t.record_stream(stream)
        return stream


def _hook(receive: Callable[[], None]) -> Callable[[], None]:
    """The receive half as a hook. Calling it twice would wait for data that never comes again.

    The hook drops `receive` (and with it the closure's tensors: x, topk_idx, the outputs) once it
    has run, so a hook the caller keeps around does not pin that memory.
    """
    pending = [receive]

    def hook() -> None:
        if not pending:
            raise RuntimeError("a low-latency receive hook can be called only once")
        pending.pop()()

    return hook
