"""Input checks that run before any communication. Each raises TypeError/ValueError with what was
expected and what came, so a user can act on the message without reading our code.

Checks that read tensor *values* (expert id range, duplicate experts) need the data on the host.
They run on CPU tensors always, and on GPU tensors unless a CUDA graph is being captured or
EP_COMM_CHECK_VALUES=0 (they cost one device-to-host copy of topk_idx).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch

FP8_BLOCK = 128          # channels per FP8 scale
UE8M0_BLOCK = 4 * FP8_BLOCK  # channels per packed int32 of UE8M0 scales
MAX_TOPK = 32

XInput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def check_tensor(name: str, t, dtype: Optional[torch.dtype] = None, ndim: Optional[int] = None,
                 shape: Optional[Sequence[Optional[int]]] = None, device: Optional[torch.device] = None) -> None:
    """Type, dtype, rank, shape (None = any size) and device of one tensor argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {_shape(t)}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                expected = "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"
                raise ValueError(f"{name} must have shape {expected}, got {_shape(t)} (dimension {axis})")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but this call runs on {device}")


def check_num_experts(num_experts: int, num_ranks: int) -> int:
    """Returns experts per rank."""
    if not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts={num_experts} must be divisible by the number of ranks ({num_ranks})")
    return num_experts // num_ranks


def values_checkable(t: torch.Tensor) -> bool:
    if os.environ.get("EP_COMM_CHECK_VALUES", "1") == "0":
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def low_latency_value_checks() -> bool:
    """EP_COMM_CHECK_LOW_LATENCY_VALUES=1: low-latency kernel calls also check ids on the host."""
    return os.environ.get("EP_COMM_CHECK_LOW_LATENCY_VALUES", "0") not in ("", "0")


# How many times a check read tensor values to the host (a device sync for CUDA tensors). Tests
# use it to prove that low-latency kernel calls never do.
host_value_reads = 0


def check_topk_idx(topk_idx, num_experts: int, num_tokens: Optional[int] = None,
                   device: Optional[torch.device] = None, distinct: bool = False,
                   read_values: bool = True) -> None:
    """topk_idx: int64 [N, K], K <= 32, every id in [-1, num_experts) (and distinct per token when
    `distinct`). The shape is always checked; the values only with `read_values` (and where
    values_checkable allows), because reading them synchronises with the device."""
    global host_value_reads
    check_tensor("topk_idx", topk_idx, torch.int64, shape=[num_tokens, None], device=device)
    if not 0 < topk_idx.shape[1] <= MAX_TOPK:
        raise ValueError(f"topk_idx has {topk_idx.shape[1]} slots per token; 1 to {MAX_TOPK} are supported")
    if not read_values or topk_idx.numel() == 0 or not values_checkable(topk_idx):
        return
    host_value_reads += 1
    host = topk_idx.cpu()
    low, high = int(host.min()), int(host.max())
    if low < -1:
        raise ValueError(f"topk_idx holds expert {low}; ids must be in [-1, {num_experts}) (-1 = no expert)")
    if high >= num_experts:
        raise ValueError(f"topk_idx holds expert {high}, but num_experts is {num_experts}")
    if distinct:
        ordered = host.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(repeated.any()):
            token = int(repeated.any(dim=1).nonzero()[0])
            raise ValueError(f"token {token} names the same expert twice in topk_idx {host[token].tolist()}; "
                             "low-latency mode needs distinct experts per token")


def check_topk_weights(topk_weights, topk_idx: torch.Tensor, device: Optional[torch.device] = None) -> None:
    check_tensor("topk_weights", topk_weights, torch.float32, shape=list(topk_idx.shape), device=device)


def split_x(x: XInput, device: Optional[torch.device] = None, allow_fp8: bool = True
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """x: bf16 [N, H], or (float8_e4m3fn [N, H], float32 scales [N, H/128]) -> (payload, scales|None)."""
    if isinstance(x, (tuple, list)):
        if not allow_fp8:
            raise TypeError("x must be a bf16 tensor here; FP8 tuples are accepted by dispatch only")
        if len(x) != 2:
            raise TypeError(f"an FP8 x must be a pair (float8_e4m3fn [N, H], float32 scales [N, H/128]), "
                            f"got a {type(x).__name__} of {len(x)}")
        payload, scales = x
        check_tensor("x[0]", payload, torch.float8_e4m3fn, ndim=2, device=device)
        hidden = payload.shape[1]
        if hidden % FP8_BLOCK != 0:
            raise ValueError(f"FP8 hidden size must be a multiple of {FP8_BLOCK}, got {hidden}")
        check_tensor("x[1] (scales)", scales, torch.float32, shape=[payload.shape[0], hidden // FP8_BLOCK],
                     device=device)
        check_row_alignment(payload)
        check_base_alignment("x[0]", payload)
        # The scales are read as single floats, and a float32 view always starts 4-byte aligned.
        return payload, scales
    check_tensor("x", x, torch.bfloat16, ndim=2, device=device)
    check_row_alignment(x)
    check_base_alignment("x", x)
    return x, None


def check_row_alignment(x: torch.Tensor) -> None:
    """Kernels move rows with 16-byte vector accesses."""
    row_bytes = x.shape[1] * x.element_size()
    if row_bytes % 16 != 0:
        raise ValueError(f"a row of x must be a multiple of 16 bytes; hidden={x.shape[1]} of {x.dtype} "
                         f"is {row_bytes} bytes")


VECTOR_BYTES = 16  # kernels load and store rows as int4


def check_base_alignment(name: str, t: torch.Tensor) -> None:
    """The first row of `t`, as the kernels will read it, starts on a 16-byte boundary.

    Kernels receive `t.contiguous().data_ptr()`. A non-contiguous tensor is copied into a fresh
    (aligned) allocation there, but a contiguous view that starts inside a row of a larger tensor
    (`big[1:].view(n, h)`, a slice at an odd element offset) keeps its address, and a 16-byte
    vector access at a misaligned address traps the whole CUDA context. Refused here, before any
    kernel runs."""
    if t.numel() == 0 or not t.is_contiguous():
        return
    offset = t.data_ptr() % VECTOR_BYTES
    if offset != 0:
        raise ValueError(f"{name} must start on a {VECTOR_BYTES}-byte boundary (the kernels use {VECTOR_BYTES}-byte "
                         f"vector accesses), but its data starts at address mod {VECTOR_BYTES} = {offset} (a view "
                         f"at storage offset {t.storage_offset()}); pass a copy ({name}.clone())")


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_bias(bias, num_tokens: int, hidden: int, device: Optional[torch.device] = None):
    """bias: None, a tensor, or a tuple of up to two tensors, each bf16 [N, H]. Returns a list."""
    if bias is None:
        return []
    items = list(bias) if isinstance(bias, (tuple, list)) else [bias]
    if len(items) > 2:
        raise ValueError(f"bias takes at most two tensors, got {len(items)}")
    items = [b for b in items if b is not None]
    for i, b in enumerate(items):
        check_tensor(f"bias[{i}]", b, torch.bfloat16, shape=[num_tokens, hidden], device=device)
        check_base_alignment(f"bias[{i}]", b)
    return items


def check_overlap_args(previous_event, async_finish: bool, allocate_on_comm_stream: bool) -> None:
    """DeepEP's rule: outputs may live on the communication stream only when the caller orders
    that stream explicitly (previous_event) and waits for the result explicitly (async_finish)."""
    if allocate_on_comm_stream and not (previous_event is not None and async_finish):
        raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True")
