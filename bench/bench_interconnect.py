"""Interconnect microbenchmarks: what the hardware between ranks can do, to judge ep_comm against.

    python bench/bench_interconnect.py                 # CPU: 4 KiB..16 MiB, GPU: 4 KiB..1 GiB
    python bench/bench_interconnect.py --max-bytes 1M --json ic.json --plot plots/

Measured, per message size (rank 1 writes into a buffer owned by rank 0; rank 0 measures alone
for the local copy):
  p2p/memcpy       GPU: rank 0's buffer opened in rank 1 through CUDA IPC (torch.multiprocessing
                   tensor sharing); `peer.copy_(src)` of contiguous bytes is one cudaMemcpyAsync
                   (a peer copy on another GPU goes through the copy engines; on the same GPU the
                   driver picks how). CPU: the same into a shared-memory tensor (a memcpy).
  p2p/sm_store     GPU, peer on the same device only: `torch.bitwise_or(src, 0, out=peer)`, an
                   elementwise kernel whose SMs load and store every word (torch launches no kernel
                   that stores into another device's memory, so cross-GPU SM stores need a _C kernel).
  local/copy       the ceiling: a local copy on rank 0 (GPU device-to-device, CPU memcpy); GB/s
                   counts the bytes copied, GB/s r+w counts read plus written (what DESIGN.md quotes).
  a2a/all_to_all_single  torch.distributed (NCCL with one GPU per rank, gloo on CPU); size = bytes
                   each rank sends; algBw = size/time, busBw = algBw x (n-1)/n as nccl-tests reports.
  nvshmem/put, nvshmem/put_signal  only if ep_comm._C exposes a microbenchmark for them
                   (`bench_nvshmem_put`); otherwise reported as unavailable in this build.
Times: CUDA events (GPU) or perf_counter (CPU), warm-up, median.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from ep_comm.bench import counting  # noqa: E402
from ep_comm.bench.report import Progress, make_meta, make_report, render_meta, render_table, write_json  # noqa: E402
from ep_comm.bench.timing import Timer  # noqa: E402

COLUMNS = [
    ("name", "benchmark", ""), ("size", "size", ""), ("latency_us", "latency us", ".2f"),
    ("gbps", "GB/s", ".3f"), ("gbps_rw", "GB/s r+w", ".3f"), ("bus_gbps", "busBw GB/s", ".3f"),
    ("status", "status", ""),
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


def _row(name: str, size: Optional[int], seconds: Optional[float] = None, status: str = "ok", **extra) -> dict:
    row = {"name": name, "size_bytes": size, "status": status, "latency_us": None, "gbps": None}
    if seconds is not None and size:
        row.update(latency_us=seconds * 1e6, gbps=counting.gbps(size, seconds))
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
            for size in sizes:
                t = solo.measure(lambda: peer[:size].copy_(src[:size]), iters, warmup)
                rows.append(_row("p2p/memcpy", size, t.median_s,
                                 peer=("same device" if same_device else f"{peer.device} from {src.device}")
                                 if device.type == "cuda" else "shared memory"))
                if device.type != "cuda":
                    continue
                if same_device and size % 4 == 0:
                    p32, s32 = peer[:size].view(torch.int32), src[:size].view(torch.int32)
                    t = solo.measure(lambda: torch.bitwise_or(s32, 0, out=p32), iters, warmup)
                    rows.append(_row("p2p/sm_store", size, t.median_s, peer="same device"))
                elif not same_device:
                    rows.append(_row("p2p/sm_store", size, status="unavailable: torch launches no kernel storing "
                                     "into another GPU's memory; needs a _C microbenchmark"))
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
            rows.append(_row("local/copy", size, t.median_s,
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
            dist.all_gather_object(times, t.median_s, group=group)
            if rank == 0:
                slowest = max(times)
                alg = counting.gbps(elems, slowest)
                rows.append(_row("a2a/all_to_all_single", elems, slowest,
                                 bus_gbps=counting.bus_bandwidth(alg, world),
                                 peer=f"{dist.get_backend(a2a_group)}, {world} ranks"))
            if bar:
                bar.update("all_to_all_single")

    # ---- NVSHMEM put / put-with-signal -----------------------------------------------------------------
    if rank == 0:
        from ep_comm import _ext
        fn = _ext.layout_function("bench_nvshmem_put") if device.type == "cuda" else None
        reason = ("unavailable in this build: ep_comm._C exposes no NVSHMEM put microbenchmark "
                  "(bench_nvshmem_put)") if device.type == "cuda" else "unavailable: needs a GPU"
        for name in ("nvshmem/put", "nvshmem/put_signal"):
            rows.append(_row(name, None, status=reason if fn is None else
                             "unavailable: bench_nvshmem_put exists but is not wired into this script yet"))
    if bar:
        bar.close()
    a2a_rows = rows if rank == 0 else []
    if rank != 0:
        return None
    return {"rows": p2p_rows + a2a_rows, "device": str(device)}


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
    lines = [render_meta(report["meta"]), ""]
    lines.append(render_table(rows, COLUMNS))
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def plot(report: dict, folder: str) -> List[str]:
    from ep_comm.bench.plots import line_chart
    rows = [r for r in report["results"] if r.get("gbps") is not None]
    return [line_chart(rows, "size_bytes", "gbps", ("name",), os.path.join(folder, "interconnect_bandwidth.png"),
                       "bandwidth vs message size", "message size (bytes)", "GB/s (bytes copied or sent / time)",
                       log_y=True),
            line_chart(rows, "size_bytes", "latency_us", ("name",), os.path.join(folder, "interconnect_latency.png"),
                       "latency vs message size", "message size (bytes)", "median time (us)", log_y=True)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=None, help="default: 2 on CPU, GPUs (at least 2) on GPU")
    p.add_argument("--min-bytes", default="4K")
    p.add_argument("--max-bytes", default=None, help="GPU 1G, CPU 16M")
    p.add_argument("--iters", type=int, default=None, help="GPU 20, CPU 5")
    p.add_argument("--warmup", type=int, default=None, help="GPU 5, CPU 1")
    p.add_argument("--cpu", action="store_true", help="measure host memory even where a GPU exists")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="DIR")
    args = p.parse_args(argv)
    use_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0 and not args.cpu
    ranks = args.ranks or (max(2, torch.cuda.device_count()) if use_gpu else 2)
    max_bytes = parse_size(args.max_bytes or ("1G" if use_gpu else "16M"))
    iters = args.iters or (20 if use_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if use_gpu else 1)
    sizes = counting.message_sizes(parse_size(args.min_bytes), max_bytes)
    if args.plot:
        from ep_comm.bench.plots import PlotsUnavailable, _pyplot
        try:
            _pyplot()
        except PlotsUnavailable as e:
            print(f"bench_interconnect: {e}", file=sys.stderr)
            return 2
    from ep_comm.bench.spawn import run_ranks
    queue = mp.get_context("spawn").Queue()
    result = run_ranks(interconnect_body, ranks, sizes=sizes, iters=iters, warmup=warmup, use_gpu=use_gpu,
                       queue=queue, progress=True)
    config = dict(sizes=f"{human_size(sizes[0])}..{human_size(sizes[-1])}", iters=iters, warmup=warmup)
    notes = ["GB/s = bytes copied (p2p, local) or sent per rank (all_to_all) / median time; GB/s r+w = read + "
             "written, the convention of the ceiling in DESIGN.md"]
    if not use_gpu:
        notes.append("CPU numbers: host memory and gloo over loopback TCP; no CUDA IPC, NVLink or NVSHMEM involved")
    report = make_report(make_meta("bench_interconnect", "gpu" if use_gpu else "cpu", ranks, config),
                         result["rows"], None, [], notes)
    print(render(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        for path in plot(report, args.plot):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
