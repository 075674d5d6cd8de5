"""Internode backend: dispatch/combine when the group spans several nodes (NVSHMEM + NVLink).

Python owns every tensor it returns and passes raw pointers, sizes and the current stream to
``ep_comm._C.InternodeRuntime``; the kernels live in csrc/kernels/internode.cu (protocol summary at
its top), the buffer layout in csrc/kernels/common/internode_layout.cuh.

Two-level scheme: a token crosses the network at most once per destination node, to the rank with
the sender's local index there, which forwards it over NVLink to its destination ranks in that node;
combine reduces inside the node (local-rank order, float32) before crossing back, and the source
adds the node partials in node order. The whole buffer is one NVSHMEM symmetric allocation of
``num_rdma_bytes`` (``Config.get_rdma_buffer_size_hint``); ``num_nvl_bytes`` is not used.

Every call starts with a notify kernel: each rank puts its row of counts (tokens per destination
rank, its token count, tokens per expert of the destination) to every rank, which also makes it a
barrier: nobody touches a peer's rings before every rank finished its previous call. Every rank then
knows the full R x R count matrix and computes each token's final row at each destination, so rows
are placed explicitly (source-rank major, ascending token) without atomics.

Calls are numbered (``epoch``) on the device: notify advances the number and the kernel after it
reads it, the same on every rank because calls are collective; counters carry it, so the buffer is
reused without clean-up kernels (and a replayed CUDA graph would advance it too).

Failures: a device timeout or a bad row is recorded in a host-mapped slot and raised as RuntimeError
(rank, phase, peer) at the next host wait or the next call; afterwards the buffer's state is
undefined: destroy the Buffers on all ranks and create new ones.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import List, Optional

import torch

from ep_comm import agreement
from ep_comm.backends import nvshmem
from ep_comm.backends.base import (Backend, BackendContext, DispatchArgs, DispatchHandle, DispatchOutput,
                                   destroy_at_exit)
from ep_comm.backends.target import KernelTarget, resolve_target
from ep_comm.config import Config


@dataclass
class _InternodeState:
    """What a dispatch leaves for combine and cached dispatch (device tensors)."""

    rank_matrix: torch.Tensor       # int32 [R, R + 1]: tokens each source sends each rank, then its N
    token_rank_cumsum: torch.Tensor  # int32 [N, R]: inclusive cumsum of is_token_in_rank over tokens
    is_token_in_rank: torch.Tensor  # bool [N, R], contiguous
    recv_src_token: torch.Tensor    # int32 [rows]: token index of each received row at its source
    num_channels: int               # the token split of this dispatch (combine must use the same)
    num_recv_tokens: Optional[int]  # None in num_worst_tokens mode (never read back to the host)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _signature(*fields) -> int:
    """uint32 digest of what every rank must agree on in one call (ring layout, slot shape, call
    kind); the notify kernel compares it across ranks before any ring is touched."""
    return zlib.crc32(repr(fields).encode())




class InternodeBackend(Backend):
    name = "internode"
    collective_destroy = True

    def __init__(self, ctx: BackendContext, target: Optional[KernelTarget] = None) -> None:
        """target: the CUDA kernels on ctx.device unless given (e.g. the emulated device)."""
        self.ctx = ctx
        self._target = target = resolve_target(ctx.device, target, "the internode kernels")
        self._C = target.module
        if ctx.num_nodes < 2:
            raise ValueError("the internode backend serves groups spanning several nodes; this one is a single node "
                             "(use the intranode backend)")
        if ctx.ranks_per_node > self._C.INTERNODE_MAX_LOCAL_RANKS:
            raise ValueError(f"the internode backend supports up to {self._C.INTERNODE_MAX_LOCAL_RANKS} ranks per "
                             f"node, got {ctx.ranks_per_node}")
        if ctx.num_rdma_bytes <= 0:
            raise ValueError("a Buffer spanning several nodes needs num_rdma_bytes > 0; size it with "
                             "Buffer.get_dispatch_config(num_ranks).get_rdma_buffer_size_hint(hidden_bytes, num_ranks) "
                             "(max with the combine config's hint)")
        self._device = target.device
        self._num_device_sms = target.num_sms
        self._destroyed = False
        self._runtime = None

        nvshmem.acquire(ctx, self._C, target.device_index)
        try:
            with self._target.on_device():
                self._runtime = self._C.InternodeRuntime(ctx.num_rdma_bytes, ctx.rank, ctx.num_ranks,
                                                         ctx.ranks_per_node, ctx.timeout_s)
        finally:
            # The runtime took its own reference; drop the bootstrap one either way.
            self._C.nvshmem_release()
        # The NVLink leg stores through nvshmem_ptr: every rank must map its node's peers.
        mapped = self._runtime.local_peers_mapped()
        everyone: List[Optional[bool]] = agreement.all_gather_object(mapped, ctx, "internode setup: peers mapped")
        if not all(everyone):
            bad = [r for r, ok in enumerate(everyone) if not ok]
            self._runtime.destroy()
            self._runtime = None
            raise RuntimeError(f"ranks {bad} cannot map the NVSHMEM buffers of their node's peers (nvshmem_ptr returned "
                               f"NULL); ranks_per_node={ctx.ranks_per_node} must match the NVLink domain "
                               "(EP_COMM_RANKS_PER_NODE), and NVSHMEM's P2P transport must be enabled")
        # Peers write into this rank's buffer from their first call on: only after all zeroed theirs.
        agreement.barrier(ctx, "internode setup: buffers zeroed")
        destroy_at_exit(self, ctx.timeout_s)

    # ---- helpers ---------------------------------------------------------------------------------
    def _check(self) -> None:
        if self._destroyed or self._runtime is None:
            raise RuntimeError("this ep_comm internode buffer was destroyed; create a new Buffer")
        if self._runtime.has_error():
            try:
                self._runtime.check_error()
            except RuntimeError as e:
                raise RuntimeError(f"{e}. The internode buffer is unusable now: destroy the Buffers on all ranks "
                                   "and create new ones") from None

    def check_errors(self) -> None:
        """Raise the first device error recorded so far (after a sync, this covers finished kernels)."""
        if not self._destroyed and self._runtime is not None and self._runtime.has_error():
            self._check()

    def _stream(self) -> int:
        return self._target.stream()

    def _refuse_capture(self, what: str) -> None:
        """Graph replays of internode calls have never run on a GPU (the call number is kept on the
        device for them, but a wrong replay would corrupt peers' rings silently): refuse capture,
        before anything is launched."""
        if self._target.is_capturing():
            raise RuntimeError(f"internode {what} cannot be captured in a CUDA graph yet (graph replay of the "
                               "internode kernels is unverified); run internode calls eagerly")

    def _check_call(self, what: str, hidden: int, num_channels: int, ring_tokens: int) -> None:
        """Refuse, before any launch, a call the buffer cannot hold or the GPU cannot co-schedule."""
        if not 1 <= num_channels <= self._C.INTERNODE_MAX_CHANNELS:
            raise ValueError(f"{what}: Config.num_sms gives {num_channels} channels; the internode kernels support "
                             f"1 to {self._C.INTERNODE_MAX_CHANNELS}")
        if num_channels > self._num_device_sms:
            raise ValueError(f"{what} with {num_channels} channels needs {num_channels} SMs resident at once, but "
                             f"{self._device} has {self._num_device_sms}; lower Config.num_sms")
        if ring_tokens < 2:
            raise ValueError(f"{what}: Config.num_max_rdma_chunked_recv_tokens must be at least 2, got {ring_tokens}")
        if hidden % 8 != 0:
            raise ValueError(f"{what}: the internode kernels need hidden to be a multiple of 8, got {hidden}")
        # Raises RuntimeError naming the bytes needed when num_rdma_bytes is too small.
        self._runtime.required_bytes(hidden * 2, num_channels, ring_tokens)

    # ---- layout ----------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        num_ranks, num_nodes = self.ctx.num_ranks, self.ctx.num_nodes
        topk = topk_idx.contiguous()
        num_tokens, num_topk = topk.shape
        if hasattr(self._C, "get_dispatch_layout"):
            per_rank = torch.empty(num_ranks, dtype=torch.int32, device=self._device)
            per_node = torch.empty(num_nodes, dtype=torch.int32, device=self._device)
            per_expert = torch.empty(num_experts, dtype=torch.int32, device=self._device)
            in_rank = torch.empty(num_tokens, num_ranks, dtype=torch.bool, device=self._device)
            self._C.get_dispatch_layout(_ptr(topk), num_tokens, num_topk, num_ranks, num_experts,
                                        self.ctx.ranks_per_node, _ptr(per_rank), _ptr(per_node), _ptr(per_expert),
                                        _ptr(in_rank), self._target.device_index, self._stream())
            self._target.after_op()
            return per_rank, per_node, per_expert, in_rank
        # torch fallback (same counting rules as the reference backend)
        experts_per_rank = num_experts // num_ranks
        hits = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=topk.device)
        hits.scatter_(1, torch.where(topk < 0, num_experts, topk), True)
        per_expert = hits[:, :num_experts].sum(0).to(torch.int32)
        dest = torch.where(topk < 0, num_ranks, topk // experts_per_rank)
        in_rank = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=topk.device)
        in_rank.scatter_(1, dest, True)
        in_rank = in_rank[:, :num_ranks].contiguous()
        per_rank = in_rank.sum(0).to(torch.int32)
        per_node = in_rank.view(num_tokens, num_nodes, self.ctx.ranks_per_node).any(dim=2).sum(0).to(torch.int32)
        return per_rank, per_node, per_expert, in_rank

    # ---- dispatch --------------------------------------------------------------------------------
    def dispatch(self, args: DispatchArgs) -> DispatchOutput:
        # Temporaries stay alive until after_op (the emulator's synchronize) has run.
        with self._target.op():
            self._check()
            self._refuse_capture("dispatch")
            num_ranks = self.ctx.num_ranks
            stream = self._stream()
            cached = args.handle is not None
            x = _aligned16(args.x)  # rows move as 16-byte vectors: the base must be aligned too
            num_tokens, hidden = x.shape
            hidden_bytes = hidden * x.element_size()
            if hidden_bytes % 16 != 0:
                raise ValueError(f"internode dispatch needs rows of a multiple of 16 bytes, got {hidden_bytes}")
            scales = args.x_scales
            num_scales = scales.shape[1] if scales is not None else 0
            ring_tokens = args.config.num_max_rdma_chunked_recv_tokens
            rdma_chunk = args.config.num_max_rdma_chunked_send_tokens
            nvl_chunk = args.config.num_max_nvl_chunked_send_tokens

            if cached:
                handle = args.handle
                state: _InternodeState = self._state_of(handle)
                num_channels = state.num_channels
                self._check_call("dispatch", hidden, num_channels, ring_tokens)
                topk_idx = topk_weights = None
                num_topk = 0
                num_local_experts = 0
                num_rows = handle.num_recv_rows
                num_worst = handle.num_worst_tokens
                signature = _signature("cached-dispatch", hidden, hidden_bytes, num_scales, num_channels, ring_tokens)
                self._runtime.notify(hidden * 2, num_channels, ring_tokens, 0, 0, 0, num_tokens, 0, 0, 0, stream,
                                     signature)
                recv_src_token = torch.empty(max(num_rows, 1), dtype=torch.int32, device=self._device)
            else:
                num_channels = args.config.num_channels
                self._check_call("dispatch", hidden, num_channels, ring_tokens)
                topk_idx = args.topk_idx.contiguous()
                topk_weights = args.topk_weights.contiguous() if args.topk_weights is not None else None
                num_topk = topk_idx.shape[1]
                if num_topk > self._C.INTERNODE_MAX_TOPK:
                    raise ValueError(f"topk_idx has {num_topk} columns; at most {self._C.INTERNODE_MAX_TOPK} are supported")
                num_experts = args.num_tokens_per_expert.numel()
                num_local_experts = num_experts // num_ranks
                if num_local_experts > self._C.INTERNODE_MAX_LOCAL_EXPERTS:
                    raise ValueError(f"the internode kernels support up to {self._C.INTERNODE_MAX_LOCAL_EXPERTS} experts per "
                                     f"rank, got {num_local_experts} ({num_experts} experts over {num_ranks} ranks)")
                num_worst = args.num_worst_tokens
                is_token_in_rank = args.is_token_in_rank.contiguous()
                num_tokens_per_rank = args.num_tokens_per_rank.to(torch.int32).contiguous()
                num_tokens_per_expert = args.num_tokens_per_expert.to(torch.int32).contiguous()
                rank_matrix = torch.empty(num_ranks, num_ranks + 1, dtype=torch.int32, device=self._device)
                recv_info = torch.empty(1 + num_local_experts, dtype=torch.int32, device=self._device)
                cumsum = torch.cumsum(is_token_in_rank, dim=0, dtype=torch.int32)
                signature = _signature("dispatch", hidden, hidden_bytes, num_scales, num_topk, num_local_experts,
                                       num_channels, ring_tokens)
                self._runtime.notify(hidden * 2, num_channels, ring_tokens, num_ranks + 1 + num_local_experts,
                                     _ptr(num_tokens_per_rank), _ptr(num_tokens_per_expert), num_tokens, num_local_experts,
                                     _ptr(rank_matrix), _ptr(recv_info), stream, signature)
                if num_worst == 0:
                    if self._target.emulated:
                        self._target.after_op()  # CPU tensors: no stream orders the read after notify
                    info = recv_info.cpu().tolist()  # the host sync of this mode (bounded by the device timeout)
                    self._check()
                    num_rows = int(info[0])
                    align = args.expert_alignment
                    per_expert_list = [(c + align - 1) // align * align for c in info[1:]]
                    num_recv = num_rows
                else:
                    num_rows = num_worst
                    per_expert_list = []
                    num_recv = None
                recv_src_token = torch.empty(max(num_rows, 1), dtype=torch.int32, device=self._device)
                state = _InternodeState(rank_matrix, cumsum, is_token_in_rank, recv_src_token, num_channels, num_recv)

            pad = num_worst > 0
            make = torch.zeros if pad else torch.empty
            recv_x = make(num_rows, hidden, dtype=x.dtype, device=self._device)
            recv_x_scales = make(num_rows, num_scales, dtype=torch.float32, device=self._device) if scales is not None else None
            recv_topk_idx = None
            recv_topk_weights = None
            if topk_idx is not None:
                recv_topk_idx = (torch.full((num_rows, num_topk), -1, dtype=torch.int64, device=self._device) if pad
                                 else torch.empty(num_rows, num_topk, dtype=torch.int64, device=self._device))
                if topk_weights is not None:
                    recv_topk_weights = make(num_rows, num_topk, dtype=torch.float32, device=self._device)

            self._runtime.dispatch(
                hidden * 2, num_channels, ring_tokens,
                _ptr(x), hidden_bytes, _ptr(scales), num_scales,
                scales.stride(0) if scales is not None else 0, scales.stride(1) if scales is not None else 0,
                _ptr(topk_idx), _ptr(topk_weights), num_topk,
                _ptr(state.is_token_in_rank), _ptr(state.token_rank_cumsum), _ptr(state.rank_matrix), num_tokens,
                num_local_experts, _ptr(recv_x), _ptr(recv_x_scales), _ptr(recv_topk_idx), _ptr(recv_topk_weights),
                _ptr(recv_src_token), num_rows, rdma_chunk, nvl_chunk, stream)

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
            self._check()
            self._refuse_capture("combine")
            state: _InternodeState = self._state_of(handle)
            config = config or Config()
            num_channels = state.num_channels  # the dispatch's token split, whatever this config says
            ring_tokens = config.num_max_rdma_chunked_recv_tokens
            x = _aligned16(x)
            hidden = x.shape[1]
            self._check_call("combine", hidden, num_channels, ring_tokens)
            weights = topk_weights.contiguous() if topk_weights is not None else None
            num_topk = weights.shape[1] if weights is not None else 0
            if num_topk > self._C.INTERNODE_MAX_TOPK:
                raise ValueError(f"topk_weights has {num_topk} columns; at most {self._C.INTERNODE_MAX_TOPK} are supported")
            biases = [_aligned16(b) for b in bias]
            bias0 = biases[0] if len(biases) > 0 else None
            bias1 = biases[1] if len(biases) > 1 else None
            num_tokens = handle.num_tokens
            combined_x = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=self._device)
            combined_weights = (torch.empty(num_tokens, num_topk, dtype=torch.float32, device=self._device)
                                if weights is not None else None)
            stream = self._stream()
            # Node partials cross the network as bf16 (DeepEP's bytes) unless asked for float32.
            float_partials = _env_flag("EP_COMM_INTERNODE_FLOAT_PARTIALS")
            signature = _signature("combine", hidden, num_topk, num_channels, ring_tokens, float_partials)
            self._runtime.notify(hidden * 2, num_channels, ring_tokens, 0, 0, 0, num_tokens, 0, 0, 0, stream,
                                 signature)
            self._runtime.combine(hidden * 2, num_channels, ring_tokens, _ptr(x), _ptr(weights), num_topk, hidden,
                                  _ptr(state.rank_matrix), _ptr(state.recv_src_token), handle.num_recv_rows,
                                  _ptr(state.is_token_in_rank), num_tokens, _ptr(bias0), _ptr(bias1), _ptr(combined_x), _ptr(combined_weights),
                                  config.num_max_rdma_chunked_send_tokens, config.num_max_nvl_chunked_send_tokens, stream,
                                  float_partials)
            return combined_x, combined_weights

    # ---- teardown --------------------------------------------------------------------------------
    def destroy(self) -> None:
        """Collective (all ranks together) and idempotent: free the symmetric buffer, release NVSHMEM."""
        if self._destroyed:
            return
        self._destroyed = True
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            with self._target.on_device():
                if not self._target.emulated:
                    torch.cuda.synchronize(self._device)
                runtime.destroy()
