"""Timing: CUDA events on GPU (warm-up, optional L2 flush, median and p99), time.perf_counter on CPU.

Every timed iteration starts with all ranks lined up (a barrier on the control-plane group, after a
device synchronize), so a rank's time is the call's own time, not the time it waited for a slow
peer to arrive. `before`/`after` callables run outside the timed region (e.g. the dispatch whose
handle a timed combine needs).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist


def percentile(samples: List[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the two nearest order statistics (numpy's
    default): with fewer than 100 samples p99 lies between the largest two."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    iters: int
    p99_s: float = 0.0

    @staticmethod
    def of(samples: List[float]) -> "Timing":
        if not samples:
            raise ValueError("no timing samples")
        return Timing(statistics.median(samples), min(samples), max(samples), len(samples), percentile(samples, 99))


class L2Flusher:
    """Writes a buffer twice the L2 size, so a timed kernel starts with a cold cache (GPU only)."""

    def __init__(self, device: torch.device) -> None:
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
        self.buffer = torch.empty(2 * l2, dtype=torch.uint8, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


class Timer:
    """Times `fn` on `device` (cpu or cuda); with a group, ranks start every iteration together."""

    def __init__(self, device: torch.device, group: Optional[dist.ProcessGroup] = None,
                 flush_l2: bool = False) -> None:
        self.device = device
        self.group = group
        self.on_gpu = device.type == "cuda"
        self.flush = L2Flusher(device) if (flush_l2 and self.on_gpu) else None

    def _line_up(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
        if self.group is not None:
            dist.barrier(group=self.group)

    def measure(self, fn: Callable[[], object], iters: int, warmup: int,
                before: Optional[Callable[[], object]] = None,
                after: Optional[Callable[[], object]] = None) -> Timing:
        if iters <= 0:
            raise ValueError(f"iters must be positive, got {iters}")
        samples: List[float] = []
        for i in range(warmup + iters):
            if before is not None:
                before()
            if self.flush is not None:
                self.flush()
            self._line_up()
            if self.on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                fn()
                seconds = time.perf_counter() - t0
            if after is not None:
                after()
            if i >= warmup:
                samples.append(seconds)
        return Timing.of(samples)


def copy_ceiling(device: torch.device, num_bytes: int, iters: int = 10, warmup: int = 3) -> dict:
    """Local copy bandwidth (dst.copy_(src)), counted as bytes read + written per second.

    GPU: a device-to-device copy timed with CUDA events. CPU: a memcpy through torch (its
    intra-op threads, all cores) timed with perf_counter. Returns {'kind', 'bytes', 'gbps', 'median_us'}.
    """
    num_bytes = max(int(num_bytes), 1 << 20)
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    timing = Timer(device).measure(lambda: dst.copy_(src), iters, warmup)
    kind = "device-to-device copy (cudaMemcpyAsync via copy_)" if device.type == "cuda" else \
        "host memcpy (torch copy_, one process)"
    return {"kind": kind, "bytes": num_bytes, "gbps": 2 * num_bytes / timing.median_s / 1e9,
            "median_us": timing.median_s * 1e6}
