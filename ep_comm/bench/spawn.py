"""Spawn helper for the benchmarks: R processes, a free port, a gloo group; rank 0's result comes back.

Package code cannot import tests/dist.py, so this is its small twin. On a GPU machine rank r uses
device r % device_count (several ranks share a GPU round-robin); the control plane is gloo because
NCCL refuses two ranks on one GPU. A body is `body(rank, world, group, **kwargs)`; what rank 0
returns is sent back through a queue and returned by :func:`run_ranks`.
"""
from __future__ import annotations

import datetime
import gc
import os
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def _worker(rank: int, world: int, port: int, timeout_s: float, body: Callable, kwargs: dict, results: Any) -> None:
    os.environ.setdefault("EP_COMM_TIMEOUT_S", str(timeout_s))
    try:
        torch.set_num_threads(_threads_per_rank(world))   # R processes share the cores
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            result = body(rank, world, dist.group.WORLD, **kwargs)
            # Tear down together, with no Buffer left to free after the group is gone: a gloo group
            # destroyed while a peer still uses its connections, or freed at interpreter exit,
            # aborts the process now and then ("terminate called without an active exception").
            gc.collect()
            dist.barrier()
        finally:
            dist.destroy_process_group()
        if rank == 0:
            results.put(("ok", rank, result))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        raise SystemExit(1)


def run_ranks(body: Callable, world: int, timeout_s: float = 600.0, **kwargs) -> Any:
    """Run `body(rank, world, group, **kwargs)` in `world` fresh processes; return rank 0's result.
    Raises RuntimeError with every failing rank's traceback."""
    if world <= 0:
        raise ValueError(f"the number of ranks must be positive, got {world}")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, timeout_s, body, kwargs, results), daemon=False)
             for r in range(world)]
    for p in procs:
        p.start()
    # Drain the queue while waiting: a large result would otherwise block rank 0's exit.
    messages = []
    deadline = time.monotonic() + timeout_s + 60
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        procs[0].join(0.05) if procs[0].is_alive() else time.sleep(0.05)
        while not results.empty():
            messages.append(results.get())
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    while not results.empty():
        messages.append(results.get())
    errors = [(r, tb) for kind, r, tb in messages if kind == "error"]
    ok = [res for kind, r, res in messages if kind == "ok"]
    if errors or any(p.exitcode != 0 for p in procs) or not ok:
        details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors))
        raise RuntimeError(f"{world} benchmark ranks failed: exit codes {[p.exitcode for p in procs]}\n{details}")
    return ok[0]
