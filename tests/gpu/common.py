"""What the GPU tests share: the skip marker, device setup, comparisons, a fail-fast rank runner,
and the dry run.

Dry run (EP_COMM_TEST_DRY_RUN=1): the tests run on CPU with the reference backend standing in for
the kernels ("kernels" Buffers are made with backend=KERNELS), so their own logic (argument names,
tuple arity, shapes, dtypes, hook and handle plumbing) is exercised without a GPU. Cases that only
make sense for kernels (device timeouts, CUDA graphs, buffer-size refusals, kernel-only error
messages) are skipped there. The library never reads this variable; only these tests do.

Imported as `from common import ...`: pytest puts tests/gpu on sys.path (rootdir-relative
"prepend" import, no __init__.py), and spawned ranks inherit the parent's sys.path.
"""
from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

from ep_comm import _ext
from ep_comm.testing import calc_diff
from dist import run_ranks as dist_run_ranks

DRY_RUN = os.environ.get("EP_COMM_TEST_DRY_RUN", "0") not in ("", "0")
KERNELS = "reference" if DRY_RUN else "kernels"

# Device waits give up after this many seconds in the GPU tests (the library's default is 100 s, and
# tests/dist.py would otherwise set it to the whole test timeout): a hang costs a minute, not ten.
DEVICE_TIMEOUT_S = "60"

# Every GPU test module sets `pytestmark = GPU_TEST`.
GPU_TEST = [pytest.mark.gpu,
            pytest.mark.skipif(not (DRY_RUN or _ext.gpu_available()),
                               reason="needs a CUDA GPU and the built ep_comm._C (or EP_COMM_TEST_DRY_RUN=1)")]

kernel_only = pytest.mark.skipif(DRY_RUN, reason="kernel-only behaviour: not part of the dry run")


def setup_device(rank: int) -> torch.device:
    """This rank's device: cuda:(rank % device_count), made current; cpu in a dry run."""
    if DRY_RUN:
        return torch.device("cpu")
    torch.cuda.set_device(rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def synchronize() -> None:
    if not DRY_RUN:
        torch.cuda.synchronize()


def split(x):
    """recv_x as (payload, scales-or-None), whether it came back as a tensor or an FP8 pair."""
    return (x[0], x[1]) if isinstance(x, tuple) else (x, None)


def exact(name: str, got, want, seed) -> None:
    """Bit-exact comparison (FP8 through its bytes; lists element-wise), the seed in the message."""
    if want is None or got is None:
        assert got is None and want is None, f"{name}: got {type(got)}, want {type(want)} (seed {seed})"
        return
    if isinstance(want, (list, tuple)):
        assert list(got) == list(want), f"{name}: {got} != {want} (seed {seed})"
        return
    got, want = got.cpu(), want.cpu()
    if got.dtype == torch.float8_e4m3fn:
        got = got.view(torch.uint8)
    if want.dtype == torch.float8_e4m3fn:
        want = want.view(torch.uint8)
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{name}: {got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)} (seed {seed})"
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        raise AssertionError(f"{name}: {bad.shape[0]} mismatches, first at {bad[0].tolist()}: "
                             f"{got[tuple(bad[0])]} != {want[tuple(bad[0])]} (seed {seed})")


def close(name: str, got, want, seed, limit: float = 5e-6) -> float:
    """calc_diff(got, want) < limit (None only matches None); returns the diff."""
    if want is None or got is None:
        assert got is None and want is None, f"{name}: got {type(got)}, want {type(want)} (seed {seed})"
        return 0.0
    got, want = got.cpu(), want.cpu()
    assert got.shape == want.shape, f"{name}: shape {list(got.shape)} != {list(want.shape)} (seed {seed})"
    diff = calc_diff(got.float(), want.float())
    assert diff < limit, f"{name}: calc_diff {diff} >= {limit} (seed {seed})"
    return diff


def run_ranks(body: Callable, world: int, timeout_s: float = 300.0, **kwargs) -> None:
    """tests/dist.run_ranks over a gloo group (GPU ranks share the control plane through gloo)."""
    dist_run_ranks(body, world, backend="gloo", timeout_s=timeout_s, **kwargs)
