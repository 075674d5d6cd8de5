"""A `deep_ep` drop-in on ep_comm: what vLLM, SGLang and Megatron-LM import from DeepEP.

    import ep_comm.deep_ep
    ep_comm.deep_ep.install()     # `import deep_ep` now gives this module (only if DeepEP is not installed)

`Buffer` takes DeepEP's constructor and method signatures, including the arguments ep_comm.Buffer
does not have (`enable_shrink`, `comm`, `dispatch_wait_recv_cost_stats`, `use_logfmt`,
`combine_wait_recv_cost_stats`), and `EventOverlap(EventHandle())` as previous_event. What ep_comm
cannot do raises NotImplementedError instead of running differently: rank masking (`enable_shrink`),
an mpi4py `comm`, the raw buffer views (`get_local_buffer_tensor`). DeepEP V2's `ElasticBuffer` and
`EPHandle` (ep_comm/deep_ep/elastic.py) map its dispatch/combine onto the same Buffer.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist

import ep_comm
from ep_comm.config import Config
from ep_comm.deep_ep import utils
from ep_comm.deep_ep.utils import EventHandle, EventOverlap, plain_event

__version__ = ep_comm.__version__  # the ep_comm version; DeepEP's own numbering does not apply

# DeepEP's dtype for topk_idx (int64 in its default build; ep_comm takes int64 only).
topk_idx_t = torch.int64


class Buffer(ep_comm.Buffer):
    """ep_comm.Buffer with DeepEP's exact signatures (see the module docstring)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm: Any = None,
                 *, backend: Optional[str] = None) -> None:
        # Every rank gets the same arguments, so every rank refuses alike before any collective step.
        if comm is not None:
            raise NotImplementedError("ep_comm.deep_ep.Buffer takes a torch.distributed group, not an mpi4py comm")
        if enable_shrink:
            raise NotImplementedError("enable_shrink=True (masking failed ranks) is not implemented by ep_comm")
        super().__init__(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
                         allow_nvlink_for_low_latency_mode, allow_mnnvl, explicitly_destroy, backend=backend)
        self.enable_shrink = False

    # ---- normal mode: previous_event may hold a DeepEP EventHandle ------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event=None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        return super().get_dispatch_layout(topk_idx, num_experts, plain_event(previous_event), async_finish,
                                           allocate_on_comm_stream)

    def dispatch(self, x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                 num_tokens_per_expert=None, topk_idx=None, topk_weights=None, expert_alignment: int = 1,
                 num_worst_tokens: int = 0, config: Optional[Config] = None, previous_event=None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        return super().dispatch(x, handle, num_tokens_per_rank, num_tokens_per_rdma_rank, is_token_in_rank,
                                num_tokens_per_expert, topk_idx, topk_weights, expert_alignment, num_worst_tokens,
                                config, plain_event(previous_event), async_finish, allocate_on_comm_stream)

    def combine(self, x: torch.Tensor, handle, topk_weights: Optional[torch.Tensor] = None, bias=None,
                config: Optional[Config] = None, previous_event=None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        return super().combine(x, handle, topk_weights, bias, config, plain_event(previous_event), async_finish,
                               allocate_on_comm_stream)

    # ---- low-latency mode: DeepEP's positional order and extra statistics arguments -------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """As ep_comm.Buffer.low_latency_dispatch. dispatch_wait_recv_cost_stats (int64 [num_ranks],
        DeepEP's per-peer wait-time counters for straggler detection) is accepted and left unchanged:
        ep_comm does not measure waits."""
        if dispatch_wait_recv_cost_stats is not None:
            _check_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, self.group_size)
        return super().low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                            cumulative_local_expert_recv_stats, use_fp8, round_scale, use_ue8m0,
                                            async_finish, return_recv_hook)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None):
        """As ep_comm.Buffer.low_latency_combine. use_logfmt=True (DeepEP's lossy 10-bit transfer
        format) is accepted and sends bf16 rows instead: the same result, without LogFMT's rounding.
        combine_wait_recv_cost_stats is accepted and left unchanged, as in low_latency_dispatch."""
        if combine_wait_recv_cost_stats is not None:
            _check_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, self.group_size)
        return super().low_latency_combine(x, topk_idx, topk_weights, handle, zero_copy, async_finish,
                                           return_recv_hook, out)

    # ---- DeepEP methods ep_comm does not provide -------------------------------------------------
    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        raise NotImplementedError("ep_comm does not expose its communication buffers as tensors "
                                  "(get_local_buffer_tensor)")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        raise RuntimeError(_NO_MASKS.format("low_latency_update_mask_buffer"))

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        raise RuntimeError(_NO_MASKS.format("low_latency_query_mask_buffer"))

    def low_latency_clean_mask_buffer(self) -> None:
        raise RuntimeError(_NO_MASKS.format("low_latency_clean_mask_buffer"))


_NO_MASKS = "{} needs Buffer(enable_shrink=True), which ep_comm does not implement"


def _check_stats(name: str, stats: torch.Tensor, num_ranks: int) -> None:
    if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int64 or tuple(stats.shape) != (num_ranks,):
        got = f"{stats.dtype} {list(stats.shape)}" if isinstance(stats, torch.Tensor) else type(stats).__name__
        raise ValueError(f"{name} must be int64 [{num_ranks}], got {got}")


# DeepEP V2's unified buffer; imported late: it builds on Buffer above.
from ep_comm.deep_ep.elastic import ElasticBuffer, EPHandle  # noqa: E402

# ---- making `import deep_ep` resolve here -------------------------------------------------------
_ENV = "EP_COMM_PROVIDE_DEEP_EP"


def install(replace_installed: bool = False) -> types.ModuleType:
    """Register this module as `deep_ep` (and `deep_ep.utils`) in sys.modules; returns it.

    Only where DeepEP itself is not installed: with a real `deep_ep` importable this raises
    RuntimeError, unless replace_installed=True says to shadow it on purpose (a warning says so).
    Idempotent. Call it in every process before the framework imports deep_ep (spawned workers
    too); or set EP_COMM_PROVIDE_DEEP_EP=1 and call install_from_env() in the process's start-up.
    """
    this = sys.modules[__name__]
    if sys.modules.get("deep_ep") is this:
        return this
    present = sys.modules.get("deep_ep")
    if present is None:
        try:
            present = importlib.util.find_spec("deep_ep")
        except (ImportError, ValueError):
            present = None
    if present is not None:
        if not replace_installed:
            raise RuntimeError("a real DeepEP (deep_ep) is installed; ep_comm.deep_ep.install() will not shadow it. "
                               "Import ep_comm.deep_ep directly, or pass replace_installed=True to shadow it "
                               "on purpose")
        warnings.warn("ep_comm.deep_ep.install(replace_installed=True): `import deep_ep` now gives ep_comm, "
                      "not the installed DeepEP", RuntimeWarning, stacklevel=2)
    sys.modules["deep_ep"] = this
    sys.modules["deep_ep.utils"] = utils
    return this


def install_from_env() -> Optional[types.ModuleType]:
    """install() if EP_COMM_PROVIDE_DEEP_EP=1 (and nothing otherwise); returns the module or None."""
    value = os.environ.get(_ENV, "")
    if value in ("", "0"):
        return None
    if value != "1":
        raise ValueError(f"{_ENV} must be 0 or 1, got {value!r}")
    return install()


__all__ = ["Buffer", "ElasticBuffer", "EPHandle", "Config", "EventOverlap", "EventHandle", "topk_idx_t", "utils",
           "install", "install_from_env", "__version__"]
