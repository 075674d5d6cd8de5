"""What the GPU tests share: the mode they run in, the skip markers, device setup, comparisons, and
a fail-fast rank runner.

Mode (KERNELS, the backend name the tests give their kernel Buffers):
  * "kernels": a CUDA GPU and the built ep_comm._C are here; tensors live on cuda:(rank % GPUs).
  * "emulated": no GPU, but the emulated device ep_comm._C_emu imports (or EP_COMM_TEST_EMULATED=1
    asks for it on a GPU machine): the same kernel code runs on CPU threads with CPU tensors, so
    plain `python -m pytest tests` runs these tests in CI. What the emulator cannot mean (CUDA
    graphs, see ../shared/EMULATOR.md "What it cannot catch") is skipped there, with its reason.
  * neither: every GPU test skips.
The library never reads EP_COMM_TEST_EMULATED; only these tests do.

Imported as `from common import ...`: pytest puts tests/gpu on sys.path (rootdir-relative
"prepend" import, no __init__.py), and spawned ranks inherit the parent's sys.path.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import pytest
import torch

from ep_comm import _ext
from ep_comm.testing import calc_diff
from dist import run_ranks as dist_run_ranks


def _mode() -> Optional[str]:
    if os.environ.get("EP_COMM_TEST_EMULATED", "0") not in ("", "0"):
        return "emulated"  # asked for: a missing _C_emu then fails the tests instead of skipping them
    if _ext.gpu_available() and torch.cuda.is_available():
        return "kernels"
    if _ext.emulated_available():
        return "emulated"
    return None


MODE = _mode()
KERNELS = MODE or "kernels"
EMULATED = MODE == "emulated"

# Device waits give up after this many seconds in the GPU tests (the library's default is 100 s, and
# tests/dist.py would otherwise set it to the whole test timeout): a hang costs a minute, not ten.
DEVICE_TIMEOUT_S = "60"

# Every GPU test module sets `pytestmark = GPU_TEST` (plus the families' own skips below).
GPU_TEST = [pytest.mark.gpu,
            pytest.mark.skipif(MODE is None, reason="needs a CUDA GPU and the built ep_comm._C, or the emulated "
                                                    f"device ep_comm._C_emu ({_ext.emulated_unavailable_reason()})")]

needs_gpu = pytest.mark.skipif(EMULATED, reason="CUDA graphs need a GPU")


def not_emulated_yet(families: str):
    """Skip a whole family the emulator does not run yet (module-level: `pytestmark = [*GPU_TEST, ...]`)."""
    return pytest.mark.skipif(EMULATED, reason=f"the emulator does not run the {families} kernels yet")


def setup_device(rank: int) -> torch.device:
    """This rank's device: cuda:(rank % device_count), made current; the CPU on the emulator
    (every rank process is its own emulated device 0)."""
    if EMULATED:
        return torch.device("cpu")
    torch.cuda.set_device(rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def synchronize() -> None:
    """Wait for this rank's device: every stream of the GPU, or of the emulated device (which also
    raises RuntimeError for a fault the emulator detected: deadlock, divergent warp collective)."""
    if EMULATED:
        _ext.require_emulated().synchronize()
    else:
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
    if not diff < limit:
        # Which rows are off tells a misplaced row from a wrong sum.
        rows = got.reshape(got.shape[0], -1).float() if got.dim() > 0 and got.shape[0] > 0 else got.reshape(1, -1).float()
        ref = want.reshape(rows.shape).float()
        bad = ((rows - ref).abs() > 1e-2 * (1 + ref.abs())).any(dim=1).nonzero().flatten().tolist()
        zero = (rows == 0).all(dim=1).nonzero().flatten().tolist()
        raise AssertionError(f"{name}: calc_diff {diff} >= {limit} (seed {seed}); {len(bad)} of {rows.shape[0]} rows "
                             f"differ (first {bad[:8]}), all-zero rows {zero[:8]}")
    return diff


def run_ranks(body: Callable, world: int, timeout_s: float = 300.0, **kwargs) -> None:
    """tests/dist.run_ranks over a gloo group (GPU ranks share the control plane through gloo)."""
    dist_run_ranks(body, world, backend="gloo", timeout_s=timeout_s, **kwargs)
