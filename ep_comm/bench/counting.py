"""Byte counting, DeepEP's way: pure functions of shapes, so they can be unit tested on any machine.

Dispatch bandwidth = bytes of the rows a rank *receives* / time; combine bandwidth = the same rows
sent back / time. A row is one token's hidden state (bf16: 2 bytes per channel) or its FP8 form
(1 byte per channel plus one float32 scale per 128 channels). Top-k ids and weights, counters and
headers are not counted (DeepEP does not count them either for the normal mode).
"""
from __future__ import annotations

from typing import Iterable, Sequence

FP8_BLOCK = 128
BF16_BYTES = 2
SCALE_BYTES = 4


def row_bytes(hidden: int, dtype: str) -> int:
    """Bytes of one token row: 'bf16' -> 2*H; 'fp8' -> H + 4*H/128 (payload plus float32 scales)."""
    if hidden <= 0:
        raise ValueError(f"hidden must be positive, got {hidden}")
    if dtype == "bf16":
        return BF16_BYTES * hidden
    if dtype == "fp8":
        if hidden % FP8_BLOCK != 0:
            raise ValueError(f"fp8 rows need hidden to be a multiple of {FP8_BLOCK}, got {hidden}")
        return hidden + SCALE_BYTES * (hidden // FP8_BLOCK)
    raise ValueError(f"dtype must be 'bf16' or 'fp8', got {dtype!r}")


def dispatch_bytes(num_recv_rows: int, hidden: int, dtype: str) -> int:
    """Bytes a rank receives in a dispatch: received rows x row bytes (scales included for fp8).
    Normal mode: one row per (token, destination rank); low-latency: one per (token, expert)."""
    if num_recv_rows < 0:
        raise ValueError(f"num_recv_rows must be >= 0, got {num_recv_rows}")
    return num_recv_rows * row_bytes(hidden, dtype)


def combine_bytes(num_recv_rows: int, hidden: int) -> int:
    """Bytes a rank sends back in a combine: the rows it received in dispatch, as bf16."""
    return dispatch_bytes(num_recv_rows, hidden, "bf16")


def normal_recv_rows(dest_ranks_per_token: Iterable[Sequence[int]], rank: int) -> int:
    """Rows `rank` receives in normal mode: tokens (of all sources) with at least one expert on it."""
    return sum(1 for ranks in dest_ranks_per_token if rank in set(ranks))


def low_latency_recv_rows(experts_per_token: Iterable[Sequence[int]], rank: int, experts_per_rank: int) -> int:
    """Rows `rank` receives in low-latency mode: (token, expert) pairs with the expert on it (-1 skipped)."""
    return sum(1 for experts in experts_per_token for e in experts
               if e >= 0 and e // experts_per_rank == rank)


def gbps(num_bytes: float, seconds: float) -> float:
    """Decimal GB/s (1e9 bytes), as DeepEP and nccl-tests print; 0 for a zero or negative time."""
    return num_bytes / seconds / 1e9 if seconds > 0 else 0.0


def bus_bandwidth(alg_bw: float, num_ranks: int) -> float:
    """nccl-tests' busBw for all-to-all: algBw x (n-1)/n (the share of bytes that leaves a rank)."""
    if num_ranks <= 0:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")
    return alg_bw * (num_ranks - 1) / num_ranks


def copy_bytes(num_bytes: int) -> int:
    """Bytes a copy of `num_bytes` moves through memory: read once plus written once."""
    return 2 * num_bytes


def fraction_of_ceiling(aggregate_recv_gbps: float, ceiling_copy_gbps: float) -> float:
    """Achieved share of the same-run copy ceiling.

    Receiving B bytes within one memory system needs at least B read and B written, which is what
    the ceiling (a local copy, counted read+written) measures; so the fraction is 2*B/t over it.
    `aggregate_recv_gbps` sums the ranks that share the memory (all ranks on one GPU or one host).
    """
    return 2 * aggregate_recv_gbps / ceiling_copy_gbps if ceiling_copy_gbps > 0 else 0.0


def message_sizes(min_bytes: int, max_bytes: int) -> list:
    """Powers of two from min_bytes to max_bytes inclusive (both rounded to powers of two)."""
    if min_bytes <= 0 or max_bytes < min_bytes:
        raise ValueError(f"need 0 < min_bytes <= max_bytes, got {min_bytes}, {max_bytes}")
    sizes, size = [], 1 << (min_bytes - 1).bit_length()
    while size <= max_bytes:
        sizes.append(size)
        size *= 2
    return sizes


def token_sweep(min_tokens: int, max_tokens: int) -> list:
    """1, 2, 4, ... up to max_tokens (max_tokens included even when not a power of two)."""
    sizes = [t for t in message_sizes(max(1, min_tokens), max_tokens)]
    if not sizes or sizes[-1] != max_tokens:
        sizes.append(max_tokens)
    return sizes
