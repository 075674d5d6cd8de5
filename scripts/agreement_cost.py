"""Cost of the agreement step (ep_comm/agreement.py) per call, on gloo ranks on this machine.

Prints, per rank, the median and p99 time of: one agreement with dispatch-like fields; a gloo
all_gather of 24 int64 (the smallest collective, for comparison); a small reference dispatch +
combine (which carries two agreements: dispatch and combine; the layout adds a third).
Usage: python scripts/agreement_cost.py [ranks] [iterations]
"""
from __future__ import annotations

import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _stats(samples):
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e6, ordered[int(0.99 * (len(ordered) - 1))] * 1e6


def _body(rank, world, port, iterations, out):
    import ep_comm
    from ep_comm import agreement
    from ep_comm.testing import make_inputs
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD
    agree = agreement.for_group(group)
    fields = [("buffer", 0), ("hidden", 7168), ("dtype", "bfloat16"), ("fp8", False), ("scale_columns", None),
              ("config", "default"), ("topk", 8), ("topk_weights", True), ("num_experts", 256)]
    times = {"agreement": [], "gloo all_gather int64[24]": [], "reference layout+dispatch+combine": []}
    inputs = make_inputs(1, rank, 64, 256, 4, 4 * world)
    buffer = ep_comm.Buffer(group, backend="reference")
    small = torch.zeros(24, dtype=torch.int64)
    gathered = [torch.empty(24, dtype=torch.int64) for _ in range(world)]
    for i in range(iterations + 20):
        dist.barrier()
        start = time.perf_counter()
        agree.agree("dispatch", fields, None, 30.0)
        mid = time.perf_counter()
        dist.all_gather(gathered, small)
        mid2 = time.perf_counter()
        layout = buffer.get_dispatch_layout(inputs.topk_idx, 4 * world)
        recv_x, _, _, _, handle, _ = buffer.dispatch(inputs.x, topk_idx=inputs.topk_idx, num_tokens_per_rank=layout[0],
                                                     is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
        buffer.combine(recv_x, handle)
        end = time.perf_counter()
        if i >= 20:
            times["agreement"].append(mid - start)
            times["gloo all_gather int64[24]"].append(mid2 - mid)
            times["reference layout+dispatch+combine"].append(end - mid2)
    out.put((rank, {name: _stats(samples) for name, samples in times.items()}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    from dist import free_port
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_body, args=(r, world, port, iterations, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    results = dict(out.get() for _ in range(world))
    print(f"{world} gloo ranks, {iterations} iterations, {os.cpu_count()} CPU cores; median / p99 in microseconds")
    for name in results[0]:
        cells = ", ".join(f"rank {r}: {results[r][name][0]:.0f} / {results[r][name][1]:.0f}" for r in sorted(results))
        print(f"  {name}: {cells}")


if __name__ == "__main__":
    main()
