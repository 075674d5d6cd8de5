"""Buffer: the DeepEP-compatible entry point. Validate -> pick backend and stream -> call -> wrap.

No algorithm lives here: backends (ep_comm/backends) do the work, on whatever stream Buffer makes
current. See docs/design.md for the contract every method follows.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import threading
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ep_comm import _ext
from ep_comm import agreement
from ep_comm import validation as v
from ep_comm.errors import EpCommTimeout, is_timeout_message
from ep_comm.backends import make_backend
from ep_comm.backends.target import kernel_target
from ep_comm.backends.base import (Backend, BackendContext, DispatchArgs, DispatchHandle, LowLatencyCombineArgs,
                                   LowLatencyDispatchArgs, LowLatencyHandle)
from ep_comm.config import Config, combine_config, dispatch_config, low_latency_rdma_size_hint
from ep_comm.event import EventOverlap, event_to_wait_for

_buffer_ids = itertools.count(1)
_BACKEND_CHOICES = ("auto", "reference", "kernels", "emulated")


def _backend_choice(requested: Optional[str]) -> str:
    """'reference', 'kernels' or 'emulated': the keyword wins, then EP_COMM_BACKEND, then what this
    machine can run ('auto' picks the kernels on a GPU, else the reference; never the emulator)."""
    choice = requested or os.environ.get("EP_COMM_BACKEND", "auto") or "auto"
    if choice not in _BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {_BACKEND_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "kernels" if _ext.gpu_available() and torch.cuda.is_available() else "reference"
    if choice == "kernels" and not (_ext.gpu_available() and torch.cuda.is_available()):
        raise RuntimeError(f"ep_comm kernels were requested but are unavailable: {_ext.unavailable_reason()}")
    if choice == "emulated" and not _ext.emulated_available():
        raise RuntimeError(f"the ep_comm emulated device was requested but is unavailable: "
                           f"{_ext.emulated_unavailable_reason()}")
    return choice


def _ranks_per_node(hosts: List[str], rank: int, num_ranks: int) -> int:
    """EP_COMM_RANKS_PER_NODE, else the number of ranks sharing this rank's host name."""
    declared = os.environ.get("EP_COMM_RANKS_PER_NODE")
    if declared:
        size = int(declared)
    else:
        size = hosts.count(hosts[rank])
        if any(hosts[i] != hosts[i - i % size] for i in range(num_ranks)):
            raise ValueError(f"ranks of one host must be contiguous and equal in number; got hosts {hosts}")
    if size <= 0 or num_ranks % size != 0:
        raise ValueError(f"ranks per node ({size}) must divide the number of ranks ({num_ranks}); "
                         "check EP_COMM_RANKS_PER_NODE")
    return size


@contextlib.contextmanager
def _timeouts_as_ep_comm_timeout() -> Iterator[None]:
    """The kernels' runtime reports a device or host timeout as a RuntimeError naming rank, phase and
    peer; callers get one exception type for every timeout, whatever the backend."""
    try:
        yield
    except EpCommTimeout:
        raise
    except RuntimeError as e:
        if is_timeout_message(str(e)):
            raise EpCommTimeout(str(e)) from e
        raise


def _bounded_hook(hook: Optional[Callable[[], None]]) -> Optional[Callable[[], None]]:
    if hook is None:
        return None

    @functools.wraps(hook)
    def run() -> None:
        with _timeouts_as_ep_comm_timeout(), torch.no_grad():
            hook()
    return run


def _bounded(fn: Callable[[], None], timeout_s: float, what: str) -> None:
    """Run `fn` on a helper thread and wait at most `timeout_s` for it: a collective teardown whose
    peer never comes must not hang the caller. The thread is abandoned (a daemon) if it overruns."""
    errors: List[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors.append(e)

    worker = threading.Thread(target=run, daemon=True, name="ep_comm-teardown")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise EpCommTimeout(f"{what} did not finish in {timeout_s:g} s (EP_COMM_TIMEOUT_S): a peer did not call "
                            "destroy(), or died; abandoned")
    if errors:
        raise errors[0]


def _capturing(t: Any) -> bool:
    """Whether a CUDA graph is being captured on the current stream (a call made for `t`)."""
    return isinstance(t, torch.Tensor) and t.is_cuda and torch.cuda.is_current_stream_capturing()


def _x_fields(x) -> List[Tuple[str, Any]]:
    """What must match across ranks about a dispatch input: hidden, dtype, FP8 scales."""
    payload, scales = (x[0], x[1]) if isinstance(x, (tuple, list)) else (x, None)
    return [("hidden", payload.shape[-1]), ("dtype", str(payload.dtype).replace("torch.", "")),
            ("fp8", scales is not None), ("scale_columns", None if scales is None else scales.shape[-1])]


def _config_fields(config: Optional[Config]) -> List[Tuple[str, Any]]:
    if config is None:
        return [("config", "default")]
    return [("config", [config.num_sms, config.num_max_nvl_chunked_send_tokens, config.num_max_nvl_chunked_recv_tokens,
                        config.num_max_rdma_chunked_send_tokens, config.num_max_rdma_chunked_recv_tokens])]


class Buffer:
    """Communication buffers and methods for MoE dispatch/combine over one process group.

    Same constructor and methods as DeepEP's `deep_ep.Buffer`. The keyword-only `backend`
    ('auto', 'reference', 'kernels', 'emulated'; default from EP_COMM_BACKEND, else 'auto') picks the
    implementation: kernels wherever the extension is built and a GPU is present, otherwise the
    torch.distributed reference, which also accepts CPU tensors over a gloo group. 'emulated' (never
    picked by 'auto') runs the kernels on the emulated device (ep_comm._C_emu) with CPU tensors:
    intranode only so far; low-latency and multi-node Buffers raise NotImplementedError there.
    """

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup] = None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, *, backend: Optional[str] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ep_comm.Buffer needs torch.distributed to be initialised first")
        self._destroyed = True  # until set up: __del__ and destroy() have nothing to release
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        timeout_s = agreement.timeout_s()
        # Every collective call of this Buffer, its creation first, is agreed by all ranks (agreement.py),
        # in the one call sequence of its group.
        self._agreement = agreement.for_group(self.group)
        self._timeout_s = timeout_s
        error = None
        try:
            for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
                v.check_positive_int(name, value, minimum=0)
            self.backend_kind = _backend_choice(backend)
        except (TypeError, ValueError, RuntimeError) as e:
            error = e
            self.backend_kind = None
        # EP_COMM_AGREE=0 lets kernel Buffers skip the per-call agreement (their kernels check call
        # signatures and time out on the device); the reference has no such checks and always agrees.
        self._agree_calls = self.backend_kind == "reference" or os.environ.get("EP_COMM_AGREE", "1") != "0"
        # A peer with other sizes would lay its buffer out differently and write past ours.
        hosts = self._agreement.agree("Buffer()", [
            ("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes),
            ("low_latency_mode", bool(low_latency_mode)), ("backend", self.backend_kind),
            ("agree_calls", self._agree_calls)], error, timeout_s, agreement.hostname())
        # Its creation's call number names this Buffer alike on every rank: calls must name the same one.
        self._agreed_id = self._agreement.seq - 1
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.explicitly_destroy = explicitly_destroy
        self._id = next(_buffer_ids)
        self._low_latency_sizes: Optional[Tuple[int, int, int]] = None  # (T, H, E) the low-latency layout is fixed to

        use_gpu = self.backend_kind == "kernels"
        use_kernels = self.backend_kind in ("kernels", "emulated")
        device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        self.device = device
        self.ctx = BackendContext(
            group=self.group, rank=self.rank, num_ranks=self.group_size,
            ranks_per_node=_ranks_per_node(hosts, self.rank, self.group_size),
            device=device, buffer_id=self._id,
            num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes, low_latency_mode=low_latency_mode,
            num_qps_per_rank=num_qps_per_rank, allow_nvlink_for_low_latency_mode=allow_nvlink_for_low_latency_mode,
            allow_mnnvl=allow_mnnvl, timeout_s=timeout_s, agreement=self._agreement)

        multi_node = self.ctx.num_nodes > 1
        target = kernel_target(self.backend_kind, device) if use_kernels else None
        if target is not None:
            # Every rank agreed on the mode above, so a family the target cannot run fails everywhere.
            target.require_family("internode" if multi_node else "intranode")
            if low_latency_mode:
                target.require_family("low_latency")

        self._reference = make_backend("reference", self.ctx)
        self._normal: Backend = self._reference
        self._low_latency: Backend = self._reference
        self._comm_stream = None
        self._last_async_low_latency: Optional[Tuple["torch.cuda.Event", bool]] = None  # (event, captured)
        if use_gpu:
            self._comm_stream = torch.cuda.Stream(device=device, priority=-1)
        if target is not None:
            if num_nvl_bytes > 0 or (multi_node and num_rdma_bytes > 0 and not low_latency_mode):
                self._normal = make_backend("internode" if multi_node else "intranode", self.ctx, target)
            if low_latency_mode:
                self._low_latency = make_backend("low_latency", self.ctx, target)
        self._destroyed = False

    # ---- statics (DeepEP-compatible) -----------------------------------------------------------
    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """SMs the normal-mode kernels may occupy (even), for configs made after this call."""
        if not isinstance(new_num_sms, int) or new_num_sms <= 0 or new_num_sms % 2 != 0:
            raise ValueError(f"num_sms must be a positive even int, got {new_num_sms!r}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return combine_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current CUDA stream (None without CUDA), to pass as previous_event."""
        if not torch.cuda.is_available():
            return EventOverlap(None)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        return EventOverlap(event)

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Whether the kernels were built for SM90 or newer (DeepEP's "SM90 features": TMA, FP8):
        any entry of _ext.compiled_cuda_archs() from 90 up. False without the extension."""
        return any(int(re.match(r"\d+", arch).group()) >= 90 for arch in _ext.compiled_cuda_archs())

    # ---- small accessors -----------------------------------------------------------------------
    def get_comm_stream(self) -> Optional["torch.cuda.Stream"]:
        return self._comm_stream

    def get_local_device_id(self) -> int:
        return self.device.index if self.device.type == "cuda" else -1

    def get_num_rdma_ranks(self) -> int:
        return self.ctx.num_nodes

    def get_rdma_rank(self) -> int:
        return self.rank // self.ctx.ranks_per_node

    def get_root_rdma_rank(self, global_rank: bool) -> int:
        return self.rank % self.ctx.ranks_per_node if global_rank else 0

    def check_errors(self) -> None:
        """Raise RuntimeError if a kernel of this Buffer recorded an error (e.g. a timeout naming rank,
        phase and peer). Kernels that never sync with the host (low-latency, cached or worst-case
        dispatch, combine) surface their errors here or at the next call."""
        with _timeouts_as_ep_comm_timeout():
            for backend in {id(b): b for b in (self._normal, self._low_latency)}.values():
                backend.check_errors()

    def destroy(self) -> None:
        """Release communication buffers; call it on all ranks together (NVSHMEM frees are collective).
        Idempotent; the Buffer refuses calls afterwards.

        A collective teardown (the low-latency kernels' NVSHMEM buffer) is agreed first and bounded: if
        a peer does not come within EP_COMM_TIMEOUT_S, this raises EpCommTimeout after releasing what
        is local, and leaves the collective part to the bounded exit hook (backends/base.py)."""
        if getattr(self, "_destroyed", True):
            return
        if self._agree_calls and any(b.collective_destroy for b in self._backends()):
            try:
                self._agreement.agree("destroy", [("buffer", self._agreed_id)], None, self._timeout_s)
            except EpCommTimeout:
                self._release(include_collective=False)
                raise
        self._release(include_collective=True)

    def _backends(self) -> List[Backend]:
        return list({id(b): b for b in (self._normal, self._low_latency, self._reference)}.values())

    def _release(self, include_collective: bool) -> None:
        if getattr(self, "_destroyed", True):
            return
        self._destroyed = True
        for backend in self._backends():
            if not backend.collective_destroy:
                backend.destroy()
            elif include_collective:
                _bounded(backend.destroy, self._timeout_s, f"ep_comm rank {self.rank}: the collective teardown of the "
                         f"{backend.name} buffer (NVSHMEM frees)")

    def __del__(self) -> None:
        # Garbage collection runs at different moments on different ranks, so it must not start a
        # collective teardown: NVSHMEM-backed buffers wait for destroy() or for the bounded exit hook.
        try:
            if not self.explicitly_destroy:
                self._release(include_collective=False)
        except Exception:
            pass

    # ---- plumbing --------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._destroyed:
            raise RuntimeError("this ep_comm.Buffer was destroyed; create a new one")

    def _agreed(self, kind: str, check: Callable, fields: Callable[[Any], List[Tuple[str, Any]]],
                capturing: bool = False):
        """Validate this rank's inputs (`check`), then agree with every rank on the call: its number,
        `kind`, `fields(checked)` (what must match across ranks) and whether everyone's inputs passed.
        A bad input raises its own error here and an EpCommMismatch naming this rank on the others;
        a mismatch raises everywhere; a rank that does not come raises EpCommTimeout on the others.
        Nothing is sent in any of these cases. Host only (a few store round trips): skipped while a
        CUDA graph is captured, whose replays run without the host."""
        error = None
        result = None
        sig: List[Tuple[str, Any]] = []
        try:
            self._check_alive()
            result = check()
            sig = fields(result)
        except (TypeError, ValueError, RuntimeError) as e:
            error = e
        if self._agree_calls and not capturing:
            self._agreement.agree(kind, [("buffer", self._agreed_id)] + sig, error, self._timeout_s)
        if error is not None:
            raise error
        return result

    def _device_of(self, backend: Backend) -> Optional[torch.device]:
        """Device every tensor must be on: the buffer's GPU for kernels, the CPU for the emulated
        device, any single device for the reference."""
        return None if backend is self._reference else self.device

    def _launch(self, fn: Callable, inputs: Sequence, previous_event: Optional[EventOverlap], async_finish: bool,
                allocate_on_comm_stream: bool, on_gpu: bool):
        """Run `fn` on the communication stream (DeepEP's overlap semantics); CPU calls run inline.
        Outputs are data, never part of a graph: the reference's torch arithmetic on inputs that
        require grad would otherwise record a graph that misses the exchange (ep_comm/autograd.py
        differentiates the plain functions)."""
        with _timeouts_as_ep_comm_timeout(), torch.no_grad():
            return self._launch_on_stream(fn, inputs, previous_event, async_finish, allocate_on_comm_stream, on_gpu)

    def _launch_on_stream(self, fn: Callable, inputs: Sequence, previous_event: Optional[EventOverlap],
                          async_finish: bool, allocate_on_comm_stream: bool, on_gpu: bool):
        if not on_gpu or self._comm_stream is None:
            result = fn()
            return result, EventOverlap(None)
        compute = torch.cuda.current_stream()
        comm = self._comm_stream
        event = event_to_wait_for(previous_event)
        if event is not None:
            comm.wait_event(event)
        else:
            comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            result = fn()
        inputs = [t for t in _flatten(inputs) if isinstance(t, torch.Tensor) and t.is_cuda]
        outputs = [t for t in _flatten(result) if isinstance(t, torch.Tensor) and t.is_cuda]
        for t in inputs:
            t.record_stream(comm)
        if async_finish:
            event = torch.cuda.Event()
            event.record(comm)
            overlap = EventOverlap(event, extra_tensors=tuple(inputs + outputs))
        else:
            compute.wait_stream(comm)
            overlap = EventOverlap(None)
        if not allocate_on_comm_stream:
            for t in outputs:
                t.record_stream(compute)
        return result, overlap

    # ---- normal mode -----------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """topk_idx: int64 [N, K] (-1 = empty slot) -> (num_tokens_per_rank int32 [R],
        num_tokens_per_rdma_rank int32 [nodes] | None, num_tokens_per_expert int32 [E],
        is_token_in_rank bool [N, R], event). No data moves, but the call is agreed like the others: a
        rank whose topk_idx is refused here would otherwise leave its peers waiting in dispatch."""
        backend = self._normal

        def check() -> None:
            v.check_overlap_args(previous_event, async_finish, allocate_on_comm_stream)
            v.check_num_experts(num_experts, self.group_size)
            v.check_topk_idx(topk_idx, num_experts, device=self._device_of(backend))

        self._agreed("get_dispatch_layout", check,
                     lambda _: [("num_experts", num_experts), ("topk", topk_idx.shape[1])], _capturing(topk_idx))
        return self._run_layout(topk_idx, num_experts, previous_event, async_finish, allocate_on_comm_stream)

    def _run_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Optional[EventOverlap],
                    async_finish: bool, allocate_on_comm_stream: bool):
        """The layout itself, after the call was agreed (the plain API agrees it as part of dispatch)."""
        backend = self._normal
        result, event = self._launch(lambda: backend.get_dispatch_layout(topk_idx, num_experts), [topk_idx],
                                     previous_event, async_finish, allocate_on_comm_stream, topk_idx.is_cuda)
        return (*result, event)

    def dispatch(self, x: v.XInput, handle: Optional[DispatchHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """Send each token to every rank holding one of its experts.

        x: bf16 [N, H] or (float8_e4m3fn [N, H], float32 [N, H/128]). Returns (recv_x (same form),
        recv_topk_idx int64 [M, K] (local ids, -1 elsewhere), recv_topk_weights float32 [M, K],
        num_recv_tokens_per_expert_list, handle, event). Rows are source-rank major, token ascending.
        With `handle` and no topk_idx (cached mode): (recv_x, None, None, None, None, event).
        """
        cached = handle is not None
        backend = self._normal

        def check() -> DispatchArgs:
            nonlocal backend
            backend = self._normal_for_transfer()
            v.check_overlap_args(previous_event, async_finish, allocate_on_comm_stream)
            device = self._device_of(backend)
            payload, scales = v.split_x(x, device)
            device = payload.device
            num_tokens = payload.shape[0]
            v.check_positive_int("expert_alignment", expert_alignment)
            v.check_positive_int("num_worst_tokens", num_worst_tokens, minimum=0)
            if config is not None and not isinstance(config, Config):
                raise TypeError(f"config must be an ep_comm.Config, got {type(config).__name__}")
            if cached:
                self._check_handle(handle, DispatchHandle)
                if topk_idx is not None or topk_weights is not None:
                    raise ValueError("cached dispatch (handle given) takes no topk_idx/topk_weights: "
                                     "the layout comes from the handle")
                if num_tokens != handle.num_tokens:
                    raise ValueError(f"x has {num_tokens} tokens but the handle was made for {handle.num_tokens}")
                return DispatchArgs(payload, scales, None, None, None, None, handle.is_token_in_rank, None, handle,
                                    expert_alignment, num_worst_tokens, config or self.get_dispatch_config(self.group_size))
            for name, t in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert), ("topk_idx", topk_idx)):
                if t is None:
                    raise ValueError(f"{name} is required without a handle (get it from get_dispatch_layout)")
            v.check_tensor("num_tokens_per_rank", num_tokens_per_rank, torch.int32, shape=[self.group_size],
                           device=device)
            v.check_tensor("is_token_in_rank", is_token_in_rank, torch.bool, shape=[num_tokens, self.group_size],
                           device=device)
            v.check_tensor("num_tokens_per_expert", num_tokens_per_expert, torch.int32, ndim=1, device=device)
            num_experts = num_tokens_per_expert.shape[0]
            v.check_num_experts(num_experts, self.group_size)
            if num_tokens_per_rdma_rank is not None:
                v.check_tensor("num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, torch.int32,
                               shape=[self.ctx.num_nodes], device=device)
            v.check_topk_idx(topk_idx, num_experts, num_tokens, device)
            if topk_weights is not None:
                v.check_topk_weights(topk_weights, topk_idx, device)
            return DispatchArgs(payload, scales, topk_idx, topk_weights, num_tokens_per_rank, num_tokens_per_rdma_rank,
                                is_token_in_rank, num_tokens_per_expert, None, expert_alignment, num_worst_tokens,
                                config or self.get_dispatch_config(self.group_size))

        def fields(args: DispatchArgs) -> List[Tuple[str, Any]]:
            sig = _x_fields(x) + _config_fields(config)
            if cached:
                return sig + [("handle_of_call", handle.agreed_call)]
            return sig + [("topk", args.topk_idx.shape[1]), ("topk_weights", args.topk_weights is not None),
                          ("num_experts", args.num_tokens_per_expert.shape[0])]

        payload = x[0] if isinstance(x, (tuple, list)) and x else x
        args = self._agreed("cached dispatch" if cached else "dispatch", check, fields, _capturing(payload))
        call = self._agreement.seq - 1
        inputs = [args.x, args.x_scales, topk_idx, topk_weights, is_token_in_rank]
        out, event = self._launch(lambda: backend.dispatch(args), inputs, previous_event, async_finish,
                                  allocate_on_comm_stream, args.x.is_cuda)
        recv_x = out.recv_x if out.recv_x_scales is None else (out.recv_x, out.recv_x_scales)
        if cached:
            return recv_x, None, None, None, None, event
        out.handle.agreed_call = call
        return recv_x, out.recv_topk_idx, out.recv_topk_weights, out.num_recv_tokens_per_expert_list, out.handle, event

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, ...], None] = None, config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """Reduce expert outputs back to their tokens: an unweighted sum over destination ranks.

        x: bf16 [M, H], the rows dispatch returned (M = its recv rows). Returns (combined_x bf16 [N, H],
        combined_topk_weights float32 [N, K] | None, event). Deterministic: same inputs, same bits.
        """
        backend = self._normal

        def check():
            nonlocal backend
            backend = self._normal_for_transfer()
            v.check_overlap_args(previous_event, async_finish, allocate_on_comm_stream)
            device = self._device_of(backend)
            self._check_handle(handle, DispatchHandle)
            v.check_tensor("x", x, torch.bfloat16, shape=[handle.num_recv_rows, None], device=device)
            v.check_row_alignment(x)
            v.check_base_alignment("x", x)
            if topk_weights is not None:
                v.check_tensor("topk_weights", topk_weights, torch.float32, shape=[handle.num_recv_rows, None],
                               device=x.device)
            if config is not None and not isinstance(config, Config):
                raise TypeError(f"config must be an ep_comm.Config, got {type(config).__name__}")
            return v.check_bias(bias, handle.num_tokens, x.shape[1], x.device)

        def fields(_) -> List[Tuple[str, Any]]:
            return [("hidden", x.shape[1]), ("topk_weights", topk_weights is not None),
                    ("topk", None if topk_weights is None else topk_weights.shape[1]),
                    ("handle_of_call", handle.agreed_call)] + _config_fields(config)

        biases = self._agreed("combine", check, fields, _capturing(x))
        cfg = config or self.get_combine_config(self.group_size)
        (combined_x, combined_weights), event = self._launch(
            lambda: backend.combine(x, handle, topk_weights, biases, cfg), [x, topk_weights, *biases],
            previous_event, async_finish, allocate_on_comm_stream, x.is_cuda)
        return combined_x, combined_weights, event

    def _normal_for_transfer(self) -> Backend:
        """The normal-mode backend for dispatch/combine. A kernel Buffer made without a buffer for
        them refuses, rather than quietly moving GPU tensors through the slow reference path."""
        self._check_alive()
        if self.backend_kind in ("kernels", "emulated") and self._normal is self._reference:
            hint = ("Buffer.get_dispatch_config(num_ranks).get_rdma_buffer_size_hint(hidden_bytes, num_ranks)"
                    if self.ctx.num_nodes > 1 else
                    "Buffer.get_dispatch_config(num_ranks).get_nvl_buffer_size_hint(hidden_bytes, num_ranks)")
            raise RuntimeError(f"this Buffer was created with num_nvl_bytes={self.num_nvl_bytes} and "
                               f"num_rdma_bytes={self.num_rdma_bytes}: normal-mode dispatch/combine needs a buffer "
                               f"for them; size it with {hint} (max with the combine config's hint)")
        return self._normal

    def _check_handle(self, handle, kind: type) -> None:
        if not isinstance(handle, kind):
            raise TypeError(f"handle must be the {kind.__name__} a previous call returned, got {type(handle).__name__}")
        if handle.buffer_id != self._id:
            raise ValueError("this handle was made by a different ep_comm.Buffer")

    # ---- low-latency mode ------------------------------------------------------------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        """Send each (token, expert) pair to the expert's rank, packed per local expert. No host sync.

        x: bf16 [N, H], N <= num_max_dispatch_tokens_per_rank (T). Returns (recv_x, recv_count int32
        [E_local], handle, event, hook): recv_x is bf16 [E_local, R*T, H], or with use_fp8 a pair
        (float8_e4m3fn [E_local, R*T, H], scales [E_local, R*T, H/128] float32 — or int32
        [E_local, R*T, H/512] packed UE8M0 — as a column-major view). Rows of expert e: its first
        recv_count[e], grouped by source rank. With return_recv_hook the call only sends; hook() receives.
        """
        backend = self._low_latency

        def check() -> LowLatencyDispatchArgs:
            self._require_low_latency()
            device = self._device_of(backend)
            v.check_tensor("x", x, torch.bfloat16, ndim=2, device=device)
            num_tokens, hidden = x.shape
            v.check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
            self._check_low_latency_sizes(num_max_dispatch_tokens_per_rank, hidden, num_experts)
            if num_tokens > num_max_dispatch_tokens_per_rank:
                raise ValueError(f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank="
                                 f"{num_max_dispatch_tokens_per_rank}")
            experts_per_rank = v.check_num_experts(num_experts, self.group_size)
            if use_fp8 and hidden % v.FP8_BLOCK != 0:
                raise ValueError(f"use_fp8 needs hidden to be a multiple of {v.FP8_BLOCK}, got {hidden}")
            if use_ue8m0 and not (use_fp8 and round_scale):
                raise ValueError("use_ue8m0=True needs use_fp8=True and round_scale=True (UE8M0 holds powers of two)")
            if use_ue8m0 and hidden % v.UE8M0_BLOCK != 0:
                raise ValueError(f"use_ue8m0 packs 4 scales per int32, so hidden must be a multiple of "
                                 f"{v.UE8M0_BLOCK}, got {hidden}")
            v.check_row_alignment(x)
            v.check_base_alignment("x", x)
            v.check_topk_idx(topk_idx, num_experts, num_tokens, x.device, distinct=True,
                             read_values=self._low_latency_reads_values(backend))
            if cumulative_local_expert_recv_stats is not None:
                v.check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, torch.int32,
                               shape=[experts_per_rank], device=x.device)
            if async_finish and return_recv_hook:
                raise ValueError("async_finish and return_recv_hook cannot both be set: the hook is the receive")
            return LowLatencyDispatchArgs(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                          cumulative_local_expert_recv_stats, use_fp8, round_scale, use_ue8m0,
                                          return_recv_hook)

        def fields(_) -> List[Tuple[str, Any]]:
            return [("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank), ("hidden", x.shape[1]),
                    ("num_experts", num_experts), ("use_fp8", bool(use_fp8)), ("round_scale", bool(round_scale)),
                    ("use_ue8m0", bool(use_ue8m0))]

        args = self._agreed("low_latency_dispatch", check, fields, _capturing(x))
        call = self._agreement.seq - 1
        out, event = self._launch_low_latency(lambda: backend.low_latency_dispatch(args), [x, topk_idx], async_finish,
                                              x.is_cuda)
        self._low_latency_sizes = (num_max_dispatch_tokens_per_rank, x.shape[1], num_experts)
        out.handle.agreed_call = call
        recv_x = out.recv_x if out.recv_x_scales is None else (out.recv_x, out.recv_x_scales)
        return recv_x, out.recv_count, out.handle, event, _bounded_hook(out.hook)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None):
        """Bring expert outputs back and reduce them with the top-k weights. No host sync.

        x: bf16 [E_local, R*T, H] laid out as low_latency_dispatch returned it; topk_idx int64 and
        topk_weights float32 [N, K] as given to dispatch. Returns (combined_x bf16 [N, H], event, hook).
        """
        backend = self._low_latency

        def check() -> LowLatencyCombineArgs:
            self._require_low_latency()
            device = self._device_of(backend)
            self._check_handle(handle, LowLatencyHandle)
            rows = self.group_size * handle.num_max_dispatch_tokens_per_rank
            v.check_tensor("x", x, torch.bfloat16,
                           shape=[handle.num_experts // self.group_size, rows, handle.hidden], device=device)
            v.check_base_alignment("x", x)
            v.check_topk_idx(topk_idx, handle.num_experts, handle.num_tokens, x.device, distinct=True,
                             read_values=self._low_latency_reads_values(backend))
            v.check_topk_weights(topk_weights, topk_idx, x.device)
            if out is not None:
                v.check_tensor("out", out, torch.bfloat16, shape=[handle.num_tokens, handle.hidden], device=x.device)
                v.check_base_alignment("out", out)
            if async_finish and return_recv_hook:
                raise ValueError("async_finish and return_recv_hook cannot both be set: the hook is the receive")
            return LowLatencyCombineArgs(x, topk_idx, topk_weights, handle, zero_copy, return_recv_hook, out)

        def fields(_) -> List[Tuple[str, Any]]:
            return [("num_max_dispatch_tokens_per_rank", handle.num_max_dispatch_tokens_per_rank),
                    ("hidden", handle.hidden), ("num_experts", handle.num_experts),
                    ("handle_of_call", handle.agreed_call)]

        args = self._agreed("low_latency_combine", check, fields, _capturing(x))
        (combined, hook), event = self._launch_low_latency(lambda: backend.low_latency_combine(args),
                                                           [x, topk_idx, topk_weights], async_finish, x.is_cuda)
        return combined, event, _bounded_hook(hook)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """bf16 [E_local, R*T, H]: write expert outputs here, then combine with zero_copy=True.
        Every combine stages its rows in this area, so fill it after the previous combine was issued."""
        self._require_low_latency()
        self._check_alive()
        self._check_handle(handle, LowLatencyHandle)
        return self._low_latency.get_next_low_latency_combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset the low-latency buffers and lay them out for (T, H, E) (all ranks call it together)."""
        sizes = (num_max_dispatch_tokens_per_rank, hidden, num_experts)

        def check() -> None:
            self._require_low_latency()
            v.check_positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
            v.check_positive_int("hidden", hidden)
            v.check_num_experts(num_experts, self.group_size)

        self._agreed("clean_low_latency_buffer", check, lambda _: [("sizes", sizes)])
        with _timeouts_as_ep_comm_timeout():
            self._low_latency.clean_low_latency_buffer(*sizes)
        self._low_latency_sizes = sizes

    def _require_low_latency(self) -> None:
        if not self.low_latency_mode:
            raise RuntimeError("low-latency calls need Buffer(..., low_latency_mode=True)")

    def _check_low_latency_sizes(self, num_max_tokens: int, hidden: int, num_experts: int) -> None:
        """The low-latency layout is fixed to one (T, H, E) until clean_low_latency_buffer: the kernels'
        buffer is laid out for it, and every backend refuses what the kernels refuse."""
        sizes = (num_max_tokens, hidden, num_experts)
        if self._low_latency_sizes is not None and self._low_latency_sizes != sizes:
            raise ValueError(f"this low-latency buffer is laid out for (num_max_dispatch_tokens_per_rank, hidden, "
                             f"num_experts)={self._low_latency_sizes}, got {sizes}; call clean_low_latency_buffer"
                             f"{sizes} on all ranks before changing sizes")

    def _low_latency_reads_values(self, backend) -> bool:
        """Whether a low-latency call checks topk_idx's values on the host. The kernels promise no
        host synchronisation, so they check ids on the device and the next call, hook or
        check_errors() raises; EP_COMM_CHECK_LOW_LATENCY_VALUES=1 adds the host check (a sync per
        call) for debugging. The reference backend synchronises anyway and always checks."""
        return backend is self._reference or v.low_latency_value_checks()

    def _launch_low_latency(self, fn: Callable, inputs: Sequence, async_finish: bool, on_gpu: bool):
        """Low-latency calls run on the current stream (CUDA-graph friendly) unless async_finish asks
        for the communication stream and an event."""
        capturing = on_gpu and torch.cuda.is_current_stream_capturing()
        if on_gpu and self._last_async_low_latency is not None:
            # The kernels count ops on the device: an op must not overtake an async one still queued
            # on the communication stream, whether or not the caller waited for its event. An event
            # can only be waited on in the world it was recorded in (eager, or the same capture); one
            # from a finished capture is covered by its graph, and an eager one before a capture is
            # the caller's to wait for (docs/low_latency.md).
            event, recorded_capturing = self._last_async_low_latency
            if recorded_capturing == capturing:
                torch.cuda.current_stream().wait_event(event)
            self._last_async_low_latency = None
        if async_finish:
            result, overlap = self._launch(fn, inputs, None, True, False, on_gpu)
            if overlap.event is not None:
                self._last_async_low_latency = (overlap.event, capturing)
            return result, overlap
        with _timeouts_as_ep_comm_timeout(), torch.no_grad():
            return fn(), EventOverlap(None)


def _flatten(items) -> list:
    out = []
    stack = [items]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dataclass_fields__"):
            stack.extend(getattr(item, f) for f in item.__dataclass_fields__)
        else:
            out.append(item)
    return out
