"""One spawn helper for every multi-rank test: R processes, a free port, a gloo (or nccl) group.

A test body is a plain function `body(rank, world, group, **kwargs)`. Failures in any rank are
re-raised in the parent with the rank's traceback, and the seed is printed so a case can be rerun.
"""
from __future__ import annotations

import datetime
import gc
import os
import socket
import time
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, timeout_s: float, body: Callable,
            kwargs: dict, errors: Any) -> None:
    os.environ["EP_COMM_TIMEOUT_S"] = os.environ.get("EP_COMM_TIMEOUT_S", str(timeout_s))
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            body(rank, world, dist.group.WORLD, **kwargs)
            # Exceptions a body caught (pytest.raises) leave reference cycles through their frames
            # that keep Buffers, and so the group, alive; freed only at interpreter exit, after
            # destroy_process_group, the gloo group aborts the process now and then
            # ("terminate called without an active exception"). Free them while the group is live.
            gc.collect()
            # Tear down together: a rank destroying its gloo group while a peer still uses its
            # connections can abort the peer ("terminate called without an active exception").
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise SystemExit(1)


def run_ranks(body: Callable, world: int, backend: str = "gloo", timeout_s: float = 120.0, grace_s: float = 15.0,
              **kwargs) -> None:
    """Run `body(rank, world, group, **kwargs)` in `world` fresh processes; raise if any rank fails.

    Fails fast: once a rank has failed, the others get `grace_s` to report their own errors and are
    then killed, instead of sitting in a collective or a device wait until the group timeout.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, backend, timeout_s, body, kwargs, errors))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s + 60
    failed_at = None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        # A failed rank reports before it exits (its exit hooks may take a while): either counts.
        if failed_at is None and (not errors.empty() or any(p.exitcode not in (None, 0) for p in procs)):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + grace_s):
            break
        time.sleep(0.2)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures or hung or any(p.exitcode != 0 for p in procs):
        details = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures))
        raise AssertionError(f"{world} ranks, kwargs={kwargs}: exit codes {[p.exitcode for p in procs]}"
                             f"{' killed (hung or after a peer failed) ' + str(hung) if hung else ''}\n{details}")
