"""Config: SM and chunk sizes for the high-throughput kernels, and buffer-size hints (DeepEP-compatible)."""
from __future__ import annotations

from dataclasses import dataclass


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


# Per-token metadata that travels with each row besides the hidden payload:
# top-k ids (int64) and weights (float32) for up to 32 slots, FP8 scales (float32 per 128
# channels, bounded here by hidden_bytes / 128 * 4), and the source index (int32).
_MAX_TOPK = 32
_META_BYTES_PER_TOKEN = _MAX_TOPK * (8 + 4) + 4


@dataclass
class Config:
    """Tuning knobs of the normal (high-throughput) kernels.

    num_sms: SMs the dispatch/combine kernels may occupy (even: one sender and one receiver per channel).
    num_max_nvl_chunked_send_tokens / num_max_nvl_chunked_recv_tokens: NVLink ring chunk and capacity, in tokens.
    num_max_rdma_chunked_send_tokens / num_max_rdma_chunked_recv_tokens: the same for the RDMA leg.

    Where the internode kernels (groups spanning nodes) differ from DeepEP's reading:
    - num_sms / 2 channels run one block each (sender, forwarder and receiver warps in one block);
      DeepEP runs two SMs per channel. num_sms=20 occupies 10 SMs.
    - num_max_rdma_chunked_recv_tokens sizes the RDMA rings (at most 16384); a call with rows
      narrower than the Buffer was sized for uses at most twice that many slots.
    - The NVLink rings hold num_max_rdma_chunked_recv_tokens / 8 slots (2 to 32):
      num_max_nvl_chunked_recv_tokens is not used there (only in one node, by the intranode kernels).
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        if self.num_sms <= 0 or self.num_sms % 2 != 0:
            raise ValueError(f"Config.num_sms must be a positive even number, got {self.num_sms}")
        if not 0 < self.num_max_nvl_chunked_send_tokens < self.num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                "Config needs 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, got "
                f"{self.num_max_nvl_chunked_send_tokens} and {self.num_max_nvl_chunked_recv_tokens}")
        if not 0 < self.num_max_rdma_chunked_send_tokens <= self.num_max_rdma_chunked_recv_tokens:
            raise ValueError(
                "Config needs 0 < num_max_rdma_chunked_send_tokens <= num_max_rdma_chunked_recv_tokens, got "
                f"{self.num_max_rdma_chunked_send_tokens} and {self.num_max_rdma_chunked_recv_tokens}")

    @property
    def num_channels(self) -> int:
        """One channel = one sending SM + one receiving SM."""
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer the normal kernels need for rows of `hidden_bytes` over `num_ranks` ranks."""
        from ep_comm import _ext

        layout = _ext.layout_function("intranode_buffer_bytes")
        if layout is not None:
            return int(layout(hidden_bytes, num_ranks, self.num_channels, self.num_max_nvl_chunked_recv_tokens))
        nvl_ranks = min(num_ranks, 8)
        token_bytes = hidden_bytes + hidden_bytes // 128 * 4 + _META_BYTES_PER_TOKEN
        ring_bytes = self.num_channels * nvl_ranks * self.num_max_nvl_chunked_recv_tokens * token_bytes
        counter_bytes = (num_ranks * num_ranks + 4 * self.num_channels * num_ranks) * 4
        return _ceil_div(ring_bytes + counter_bytes, 128) * 128

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of RDMA (NVSHMEM symmetric) buffer the internode kernels need; 0 within one node."""
        from ep_comm import _ext

        layout = _ext.layout_function("internode_rdma_buffer_bytes")
        if layout is not None:
            return int(layout(hidden_bytes, num_ranks, self.num_channels, self.num_max_rdma_chunked_recv_tokens))
        num_nodes = _ceil_div(num_ranks, 8)
        if num_nodes <= 1:
            return 0
        token_bytes = hidden_bytes + hidden_bytes // 128 * 4 + _META_BYTES_PER_TOKEN
        ring_bytes = 2 * self.num_channels * num_nodes * self.num_max_rdma_chunked_recv_tokens * token_bytes
        return _ceil_div(ring_bytes + (1 << 20), 128) * 128


# Defaults per rank count, as DeepEP's get_dispatch_config / get_combine_config give them.
_DISPATCH_CHUNKS = {2: (24, 256), 4: (6, 256), 8: (6, 256)}
_COMBINE_CHUNKS = {2: (10, 256), 4: (9, 256), 8: (4, 256)}


def _config_for(table: dict, num_ranks: int, num_sms: int) -> Config:
    send, recv = table.get(num_ranks, (6, 256) if num_ranks <= 8 else (6, 256))
    rdma_send, rdma_recv = (6, 256) if num_ranks <= 8 else (8, 128)
    return Config(num_sms, send, recv, rdma_send, rdma_recv)


def dispatch_config(num_ranks: int, num_sms: int) -> Config:
    return _config_for(_DISPATCH_CHUNKS, num_ranks, num_sms)


def combine_config(num_ranks: int, num_sms: int) -> Config:
    return _config_for(_COMBINE_CHUNKS, num_ranks, num_sms)


def low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                               num_experts: int) -> int:
    """Bytes of NVSHMEM symmetric buffer low-latency mode needs (two buffers, so calls can alternate)."""
    from ep_comm import _ext

    layout = _ext.layout_function("low_latency_buffer_bytes")
    if layout is not None:
        return int(layout(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts))
    # Per buffer: a dispatch slot per (local expert, source rank, token) holding the bf16 row plus
    # FP8 scales and the source index, and a combine slot per (expert, token) holding a bf16 row.
    dispatch_row = 16 + hidden * 2 + hidden // 128 * 4
    combine_row = hidden * 2
    per_buffer = num_experts * num_max_dispatch_tokens_per_rank * (dispatch_row + combine_row)
    per_buffer += num_experts * 4 * 4  # count and signal words
    return 2 * _ceil_div(per_buffer, 128) * 128
