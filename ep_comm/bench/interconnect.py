"""python -m ep_comm.bench interconnect: what the hardware between ranks can do, to judge ep_comm against.

    python -m ep_comm.bench interconnect               # CPU: 4 KiB..16 MiB, GPU: 4 KiB..1 GiB
    python -m ep_comm.bench interconnect --max-bytes 1M --json ic.json --plot plots/

Measured, per message size (rank 1 writes into a buffer owned by rank 0; rank 0 measures alone
for the local copy):
  p2p/memcpy       GPU: rank 0's buffer opened in rank 1 through CUDA IPC (torch.multiprocessing
                   tensor sharing); `peer.copy_(src)` of contiguous bytes is one cudaMemcpyAsync
                   (a peer copy on another GPU goes through the copy engines; on the same GPU the
                   driver picks how). CPU: the same into a shared-memory tensor (a memcpy).
  p2p/sm_store     GPU: the same IPC mapping written by ep_comm._C.sm_copy, a grid-stride kernel of
                   16-byte loads and stores (one block per SM): NVLink/P2P bandwidth by SM stores, the
                   way the intranode kernels move data, on the same GPU or across GPUs. Checked for
                   correct bytes first (odd length, aligned and misaligned). Without the extension:
                   `torch.bitwise_or(src, 0, out=peer)` on the same device only.
  local/copy       the ceiling: a local copy on rank 0 (GPU device-to-device, CPU memcpy); GB/s
                   counts the bytes copied, GB/s r+w counts read plus written (the ceiling's convention).
  a2a/all_to_all_single  torch.distributed (NCCL with one GPU per rank, gloo on CPU); size = bytes
                   each rank sends; algBw = size/time, busBw = algBw x (n-1)/n as nccl-tests reports.
  nvshmem/put, nvshmem/put_signal  GPU: NVSHMEM initialised as a Buffer does
                   (ep_comm.backends.nvshmem.acquire), a symmetric ep_comm._C.NvshmemScratch; rank 1
                   puts into rank 0's buffer with nvshmemx_putmem_nbi_block (or putmem_signal_nbi_block,
                   adding 1 to a signal word), the message split over blocks (32 KiB+ each, at most
                   one per SM), repeated up to 100 times in one kernel that ends with nvshmem_quiet;
                   time per message = kernel time / repetitions. Sizes capped by free GPU memory.
  nvshmem/pingpong GPU: ranks 0 and 1, one thread each, bounce a put-with-signal of 8 B..4 KiB;
                   latency = half the round trip (device global timer over 100 round trips).
Times: CUDA events (GPU) or perf_counter (CPU), warm-up, then the median and p99 of the timed
iterations (all_to_all_single: of the slowest rank).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ep_comm import _ext
from ep_comm.bench import counting
from ep_comm.bench.report import Progress, make_meta, make_report, render_meta, render_table, write_json
from ep_comm.bench.timing import Timer, Timing

COLUMNS = [
    ("name", "benchmark", ""), ("size", "size", ""), ("latency_us", "median us", ".2f"), ("p99_us", "p99 us", ".2f"),
    ("gbps", "GB/s", ".3f"), ("gbps_rw", "GB/s r+w", ".3f"), ("bus_gbps", "busbw GB/s", ".3f"),
    ("status", "status", ""),
]
COLUMN_HELP = [
    "median us / p99 us: median and 99th percentile of the timed iterations (all_to_all_single: the slowest rank's)",
    "GB/s: bytes copied (p2p, local) or sent per rank (all_to_all_single: algbw) / median time",
    "GB/s r+w: local/copy counted as bytes read + written (the ceiling's convention)",
    "busbw GB/s: all_to_all_single's algbw x (n-1)/n, as nccl-tests reports it",
]


def parse_size(text: str) -> int:
    """'4K', '1M', '1G', '4096' -> bytes (binary units)."""
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human_size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= scale and num_bytes % scale == 0:
            return f"{num_bytes // scale} {unit}"
    return f"{num_bytes} B"


def _row(name: str, size: Optional[int], seconds=None, status: str = "ok", **extra) -> dict:
    """seconds: a Timing (median and p99) or a plain median in seconds."""
    row = {"name": name, "size_bytes": size, "status": status, "latency_us": None, "p99_us": None, "gbps": None}
    if seconds is not None and size:
        median = seconds.median_s if isinstance(seconds, Timing) else seconds
        row.update(latency_us=median * 1e6, gbps=counting.gbps(size, median))
        if isinstance(seconds, Timing):
            row["p99_us"] = seconds.p99_s * 1e6
    row.update(extra)
    return row


def _device(use_gpu: bool, rank: int) -> torch.device:
    if use_gpu:
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def interconnect_body(rank: int, world: int, group, sizes: List[int], iters: int, warmup: int, use_gpu: bool,
                      queue, progress: bool = False) -> Optional[dict]:
    device = _device(use_gpu, rank)
    rows: List[dict] = []
    max_size = max(sizes)
    bar = Progress(len(sizes) * 3, "interconnect", enabled=None if progress else False) if rank == 0 else None
    solo = Timer(device, None)

    # ---- peer-to-peer: rank 1 writes into rank 0's buffer ------------------------------------------
    if world >= 2:
        if rank == 0:
            owned = torch.zeros(max_size, dtype=torch.uint8, device=device)
            if device.type == "cpu":
                owned.share_memory_()
            queue.put(owned)           # CUDA tensors travel as IPC handles, CPU ones as shared memory
        dist.barrier(group=group)
        if rank == 1:
            peer = queue.get()
            src = torch.ones(max_size, dtype=torch.uint8, device=device)
            same_device = peer.device == src.device
            where = ("same device" if same_device else f"{peer.device} from {src.device}") \
                if device.type == "cuda" else "shared memory"
            C = _microbench_extension() if device.type == "cuda" else None
            try:
                copy_error = _check_sm_copy(C, peer, device) if C is not None else None
            except RuntimeError as e:
                copy_error = f"failed: {e}"
            for size in sizes:
                t = solo.measure(lambda: peer[:size].copy_(src[:size]), iters, warmup)
                rows.append(_row("p2p/memcpy", size, t, peer=where))
                if device.type != "cuda":
                    continue
                if C is not None:
                    if copy_error:
                        rows.append(_row("p2p/sm_store", size, status=copy_error))
                        continue
                    dst_ptr, src_ptr = peer.data_ptr(), src.data_ptr()
                    stream = torch.cuda.current_stream(device).cuda_stream
                    t = solo.measure(lambda: C.sm_copy(dst_ptr, src_ptr, size, device.index, 0, stream), iters, warmup)
                    rows.append(_row("p2p/sm_store", size, t, peer=f"{where}, _C.sm_copy"))
                elif same_device and size % 4 == 0:
                    p32, s32 = peer[:size].view(torch.int32), src[:size].view(torch.int32)
                    t = solo.measure(lambda: torch.bitwise_or(s32, 0, out=p32), iters, warmup)
                    rows.append(_row("p2p/sm_store", size, t, peer="same device, torch.bitwise_or"))
                elif not same_device:
                    rows.append(_row("p2p/sm_store", size, status="unavailable in this build: ep_comm._C has no "
                                     "sm_copy, and torch launches no kernel storing into another GPU's memory"))
            if device.type != "cuda":
                rows.append(_row("p2p/sm_store", None, status="unavailable: needs a GPU (SM stores into a peer's "
                                 "CUDA IPC mapping)"))
            del peer
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        dist.barrier(group=group)
        if rank == 0:
            del owned
    else:
        rows.append(_row("p2p/memcpy", None, status="unavailable: needs --ranks >= 2"))
    p2p_rows = gather_rows(rows, group, rank)
    if bar:
        bar.update("p2p", len(sizes))

    # ---- the ceiling: a local copy on rank 0 --------------------------------------------------------
    rows = []
    if rank == 0:
        src = torch.ones(max_size, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        for size in sizes:
            t = solo.measure(lambda: dst[:size].copy_(src[:size]), iters, warmup)
            rows.append(_row("local/copy", size, t,
                             gbps_rw=counting.gbps(counting.copy_bytes(size), t.median_s),
                             peer="device-to-device" if device.type == "cuda" else "host memcpy"))
        del src, dst
        bar.update("local copy", len(sizes))
    dist.barrier(group=group)

    # ---- all_to_all_single ------------------------------------------------------------------------------
    a2a_group, why_not = group, ""
    if device.type == "cuda":
        if torch.cuda.device_count() >= world:
            a2a_group = dist.new_group(list(range(world)), backend="nccl")
        else:
            a2a_group, why_not = None, (f"unavailable: {world} ranks share {torch.cuda.device_count()} GPU(s) and "
                                        "NCCL refuses two ranks per GPU; compare with local/copy")
    if a2a_group is None:
        rows.append(_row("a2a/all_to_all_single", None, status=why_not))
    else:
        timer = Timer(device, a2a_group)
        for size in sizes:
            elems = max(world, size // world * world)
            send = torch.ones(elems, dtype=torch.uint8, device=device)
            recv = torch.empty_like(send)
            t = timer.measure(lambda: dist.all_to_all_single(recv, send, group=a2a_group), iters, warmup)
            times = [None] * world
            dist.all_gather_object(times, (t.median_s, t.p99_s), group=group)
            if rank == 0:
                slowest = Timing(max(m for m, _ in times), 0.0, 0.0, iters, max(p for _, p in times))
                alg = counting.gbps(elems, slowest.median_s)
                rows.append(_row("a2a/all_to_all_single", elems, slowest,
                                 bus_gbps=counting.bus_bandwidth(alg, world),
                                 peer=f"{dist.get_backend(a2a_group)}, {world} ranks"))
            if bar:
                bar.update("all_to_all_single")

    # ---- NVSHMEM put / put-with-signal / ping-pong (collective over all ranks) ---------------------------
    nvshmem_rows = gather_rows(measure_nvshmem(rank, world, group, device, sizes, iters, warmup), group, rank)
    if rank == 0:
        rows.extend(sorted(nvshmem_rows, key=lambda r: NVSHMEM_ROWS.index(r["name"])))  # stable: sizes stay in order
    if bar:
        bar.close()
    a2a_rows = rows if rank == 0 else []
    if rank != 0:
        return None
    return {"rows": p2p_rows + a2a_rows, "device": str(device)}


# ---- ep_comm._C microbenchmarks --------------------------------------------------------------------------

NVSHMEM_ROWS = ("nvshmem/put", "nvshmem/put_signal", "nvshmem/pingpong")
# Offsets in the NVSHMEM scratch buffer (the same on every rank: it is symmetric).
SIGNAL_PUT = 0            # put_signal adds here on the destination (nobody waits on it)
SIGNAL_PING = 8           # the ping-pong's signal word (each call leaves it at 0)
PING_MSG = 4096           # ping-pong messages, up to PING_MAX_BYTES
PING_MAX_BYTES = 4096
PUT_SRC = 8192            # put source on rank 1; the destination on rank 0 follows it
PING_SIZES = (8, 256, 4096)
PING_ROUND_TRIPS = 100
PUTS_PER_LAUNCH_BYTES = 64 << 20   # repeat small puts in one kernel up to this many bytes (at most 100)
PINGPONG_TIMEOUT_S = 30.0


def _microbench_extension():
    """ep_comm._C when it is built with the microbenchmarks and sees a GPU, else None."""
    if not _ext.gpu_available():
        return None
    C = _ext.load()
    return C if hasattr(C, "sm_copy") and hasattr(C, "NvshmemScratch") else None


def _check_sm_copy(C, peer: torch.Tensor, device: torch.device) -> Optional[str]:
    """Enable P2P access to the peer's device, run _C.sm_copy into the peer mapping (odd length; aligned,
    then misaligned) and compare bytes. None when both copies are exact, else the sm_store rows' status.
    """
    if peer.device != device and not C.enable_peer_access(device.index, peer.device.index):
        return f"unavailable: {device} cannot access {peer.device} (no P2P path between them)"
    n = min(peer.numel() - 16, (1 << 20) + 7)
    if n <= 0:
        return None
    gen = torch.Generator(device="cpu").manual_seed(7)
    src = torch.randint(0, 256, (n + 16,), dtype=torch.uint8, generator=gen).to(device)
    stream = torch.cuda.current_stream(device).cuda_stream
    for dst_off, src_off, length in ((0, 0, n), (1, 3, n - 8)):
        peer.zero_()
        torch.cuda.synchronize(peer.device)
        C.sm_copy(peer.data_ptr() + dst_off, src.data_ptr() + src_off, length, device.index, 0, stream)
        torch.cuda.synchronize(device)
        got = peer[dst_off:dst_off + length + 1].to(device)
        if not torch.equal(got[:length], src[src_off:src_off + length]) or got[length].item() != 0 or \
                (dst_off and peer[:dst_off].any().item()):
            return (f"failed: sm_copy of {length} bytes (dst+{dst_off}, src+{src_off}) did not reproduce the source "
                    "exactly; not timed")
    return None


def _agree_on_error(error: Optional[str], group) -> Optional[str]:
    """The first rank's error message, or None: every rank stops measuring together."""
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, error, group=group)
    return next((f"failed on rank {r}: {e}" for r, e in enumerate(everyone) if e), None)


def _nvshmem_reason(device: torch.device, world: int) -> str:
    """Why the NVSHMEM rows cannot be measured here ('' when they can); the same on every rank."""
    if device.type != "cuda":
        return "unavailable: needs a GPU"
    if world < 2:
        return "unavailable: needs --ranks >= 2"
    C = _ext.load()
    if C is None:
        return f"unavailable: {_ext.unavailable_reason()}"
    if not hasattr(C, "NvshmemScratch"):
        return "unavailable in this build: ep_comm._C has no NvshmemScratch (rebuild the extension)"
    if not _ext.gpu_available():
        return "unavailable: ep_comm._C sees no CUDA device"
    return ""


def measure_nvshmem(rank: int, world: int, group, device: torch.device, sizes: List[int], iters: int,
                    warmup: int) -> List[dict]:
    """NVSHMEM put, put-with-signal and ping-pong rows (collective over `group`; rows on ranks 0 and 1).

    NVSHMEM comes up exactly as a Buffer brings it up (ep_comm.backends.nvshmem.acquire with a
    BackendContext; NVLink/P2P allowed, so peers on this node are reached by SM stores unless the user
    set NVSHMEM_DISABLE_P2P=1), then an NvshmemScratch takes its own reference and a symmetric buffer.
    """
    reason = _nvshmem_reason(device, world)
    if reason:
        return [_row(name, None, status=reason) for name in NVSHMEM_ROWS] if rank == 0 else []
    from ep_comm.backends import nvshmem
    from ep_comm.backends.base import BackendContext
    C = _ext.load()

    # Every rank allocates the same symmetric size: fit the largest put (source + destination) into
    # half the free memory of each rank's share of its GPU, the tightest rank deciding.
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free_bytes = torch.cuda.mem_get_info(device)[0]
    ranks_per_gpu = -(-world // torch.cuda.device_count())
    budgets = [None] * world
    dist.all_gather_object(budgets, free_bytes // ranks_per_gpu // 2 - nvshmem.HEAP_HEADROOM, group=group)
    put_sizes = [s for s in sizes if PUT_SRC + 2 * s <= min(budgets)]
    if not put_sizes:
        return [_row(name, None, status="unavailable: not enough free GPU memory for an NVSHMEM buffer")
                for name in NVSHMEM_ROWS] if rank == 0 else []
    max_put = put_sizes[-1]
    scratch_bytes = PUT_SRC + 2 * max_put

    ctx = BackendContext(group=group, rank=rank, num_ranks=world, ranks_per_node=world, device=device, buffer_id=-1,
                         num_nvl_bytes=0, num_rdma_bytes=scratch_bytes, low_latency_mode=False, num_qps_per_rank=1,
                         allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, timeout_s=PINGPONG_TIMEOUT_S)
    try:
        nvshmem.acquire(ctx, C, device.index)
    except RuntimeError as e:
        return [_row(name, None, status=f"failed on rank {rank}: {e}") for name in NVSHMEM_ROWS]
    scratch = None
    try:
        scratch = C.NvshmemScratch(scratch_bytes, rank, world, device.index)
        dist.barrier(group=group)  # every buffer zeroed before anyone writes into it
        return _nvshmem_measure(C, scratch, rank, world, group, device, put_sizes, iters, warmup)
    finally:
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # nobody frees while a peer still writes
        if scratch is not None:
            scratch.destroy()
        C.nvshmem_release()


def _nvshmem_measure(C, scratch, rank: int, world: int, group, device: torch.device, put_sizes: List[int],
                     iters: int, warmup: int) -> List[dict]:
    rows: List[dict] = []
    stream = torch.cuda.current_stream(device).cuda_stream
    same_gpu = torch.cuda.device_count() == 1
    put_dst = PUT_SRC + put_sizes[-1]

    # Bandwidth: rank 1 puts into rank 0's buffer; the others wait.
    error = None
    if rank == 1:
        how = ("P2P: nvshmem_ptr maps rank 0" if scratch.peer_is_p2p(0) else "NVSHMEM remote transport") + \
              (", same GPU" if same_gpu else "")
        solo = Timer(device, None)
        try:
            for name, with_signal in (("nvshmem/put", False), ("nvshmem/put_signal", True)):
                for size in put_sizes:
                    reps = max(1, min(100, PUTS_PER_LAUNCH_BYTES // size))
                    t = solo.measure(lambda: scratch.put_bench(put_dst, PUT_SRC, size, 0, reps, with_signal,
                                                               SIGNAL_PUT, 0, stream), iters, warmup)
                    per_put = Timing(t.median_s / reps, t.min_s / reps, t.max_s / reps, t.iters, t.p99_s / reps)
                    rows.append(_row(name, size, per_put, peer=f"rank 1 -> 0, {how}", puts_per_launch=reps))
        except RuntimeError as e:
            error = str(e)
    error = _agree_on_error(error, group)
    if error:
        return [_row(name, None, status=error) for name in NVSHMEM_ROWS] if rank == 0 else []

    # Latency: ranks 0 and 1 bounce small messages; every rank joins the barriers and the agreement.
    calls, warm_calls = max(1, min(iters, 5)), 1 if warmup > 0 else 0
    for size in (s for s in PING_SIZES if s <= PING_MAX_BYTES):
        half_rtt_ns: List[float] = []
        for i in range(warm_calls + calls):
            dist.barrier(group=group)  # both kernels start close together (the first round is untimed anyway)
            error = None
            if rank < 2:
                try:
                    r = scratch.pingpong(PING_MSG, size, SIGNAL_PING, 1 - rank, rank == 0, PING_ROUND_TRIPS,
                                         PINGPONG_TIMEOUT_S, stream)
                    half_rtt_ns.append(r["elapsed_ns"] / r["round_trips"] / 2)
                except RuntimeError as e:
                    error = str(e)
            error = _agree_on_error(error, group)
            if error:
                break
        if rank == 0:
            if error:
                rows.append(_row("nvshmem/pingpong", size, status=error))
            else:
                half = statistics.median(half_rtt_ns[warm_calls:])
                how = "P2P" if scratch.peer_is_p2p(1) else "NVSHMEM remote transport"
                row = _row("nvshmem/pingpong", size, half / 1e9, round_trips=PING_ROUND_TRIPS,
                           peer=f"ranks 0 <-> 1, half round trip, {how}" +
                           (", same GPU (time-sliced without MPS)" if same_gpu else ""))
                row["gbps"] = None
                rows.append(row)
        if error:
            break  # the signal words are undefined after a timeout
    return rows


def gather_rows(rows: List[dict], group, rank: int) -> List[dict]:
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, rows, group=group)
    return [r for per_rank in everyone for r in per_rank] if rank == 0 else []


def render(report: dict) -> str:
    rows = []
    for r in report["results"]:
        r = dict(r)
        r["size"] = human_size(r["size_bytes"]) if r.get("size_bytes") else "-"
        if r.get("peer") and r["status"] == "ok":
            r["status"] = f"ok ({r['peer']})"
        rows.append(r)
    lines = [render_meta(report["meta"])]
    lines += [f"  {line}" for line in COLUMN_HELP]
    lines.append("")
    lines.append(render_table(rows, COLUMNS))
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def plot(report: dict, folder: str) -> List[str]:
    from ep_comm.bench.plots import chart_title, line_chart
    rows = [dict(r, op=r["name"]) for r in report["results"] if r.get("gbps") is not None]
    title = chart_title(report["meta"])
    return [line_chart(rows, "size_bytes", "gbps", os.path.join(folder, "interconnect_bandwidth.png"),
                       f"bandwidth vs message size\n{title}", "message size", "GB/s (bytes copied or sent / median time)",
                       x_bytes=True, log_y=True),
            line_chart(rows, "size_bytes", "latency_us", os.path.join(folder, "interconnect_latency.png"),
                       f"latency vs message size\n{title}", "message size", "median time (us)", x_bytes=True,
                       log_y=True)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ep_comm.bench interconnect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=None, help="default: 2 on CPU, GPUs (at least 2) on GPU")
    p.add_argument("--min-bytes", default="4K", help="smallest message (4K, 1M, 1G or bytes; default 4K)")
    p.add_argument("--max-bytes", default=None, help="largest message (GPU 1G, CPU 16M)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (GPU 20, CPU 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (GPU 5, CPU 1)")
    p.add_argument("--cpu", action="store_true", help="measure host memory even where a GPU exists")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON (schema in BENCHMARKS.md)")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts here (needs matplotlib: pip install .[bench])")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    use_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0 and not args.cpu
    ranks = args.ranks or (max(2, torch.cuda.device_count()) if use_gpu else 2)
    max_bytes = parse_size(args.max_bytes or ("1G" if use_gpu else "16M"))
    iters = args.iters or (20 if use_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if use_gpu else 1)
    sizes = counting.message_sizes(parse_size(args.min_bytes), max_bytes)
    if args.plot:
        from ep_comm.bench.plots import PlotsUnavailable, require_matplotlib
        try:
            require_matplotlib()
        except PlotsUnavailable as e:
            print(f"ep_comm.bench interconnect: {e}", file=sys.stderr)
            return 2
    from ep_comm.bench.spawn import run_ranks
    queue = mp.get_context("spawn").Queue()
    result = run_ranks(interconnect_body, ranks, sizes=sizes, iters=iters, warmup=warmup, use_gpu=use_gpu,
                       queue=queue, progress=True)
    config = dict(sizes=f"{human_size(sizes[0])}..{human_size(sizes[-1])}", iters=iters, warmup=warmup)
    notes = []
    if not use_gpu:
        notes.append("CPU numbers: host memory and gloo over loopback TCP; no CUDA IPC, NVLink or NVSHMEM involved")
    report = make_report(make_meta("ep_comm.bench interconnect", "gpu" if use_gpu else "cpu", ranks, config),
                         result["rows"], None, [], notes)
    print(render(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        for path in plot(report, args.plot):
            print(f"wrote {path}")
    return 0
