"""The emulated device itself (csrc/emulator): it runs correct programs correctly, under every fiber
schedule, and reports what it claims to detect.

The kernels are tests/emulator_device/*.cu, compiled once per session as host C++ with the
emulator's flags (setup.py's emulator_flags) into one executable that runs one case per process: a
kernel fault is sticky for the process, as for a CUDA context. Fault reports must name the kernel,
the block, the thread(s) and the file:line where they wait; those lines carry `// @tag name` in
the sources, so the assertions follow the sources when they move.

What the kernels' own tests (tests/gpu on the emulator) do not exercise lives here: each intrinsic,
partial warp masks, deadlock/divergence/hang/trap reports, refused launches, the guard page, streams,
events and IPC between processes.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES_DIR = Path(__file__).resolve().parent / "emulator_device"
EMULATOR_SOURCES = [ROOT / "csrc" / "emulator" / name for name in ("runtime.cpp", "scheduler.cpp", "nvshmem.cpp")]
# setup.py's emulator_flags, less what only a Python module needs (-fPIC, visibility, module name).
CXX_FLAGS = ["-x", "c++", "-std=c++17", "-DEP_COMM_EMULATOR", f"-I{ROOT / 'csrc' / 'emulator' / 'include'}",
             f"-I{ROOT / 'csrc'}", "-O2", "-g1", "-pthread", "-Wall", "-Wno-sign-compare", "-Wno-unknown-pragmas"]
SCHEDULES = ["forward", "reverse", "random:1", "random:2"]
CORRECT_CASES = ["cross_block_spin", "grid_barrier", "syncthreads_reduce", "warp_collectives", "warp_reductions",
                 "syncwarp_partial",
                 "named_barriers", "shared_memory", "indexing"]
FAULT_CASES = ["deadlock", "divergent_skip", "divergent_mask", "divergent_exit", "barrier_mismatch",
               "barrier_not_warp_multiple", "trap", "hang", "sticky_fault"]
OTHER_CASES = ["schedule_probe", "launch_refusal", "guard_page", "fresh_memory", "stream_order",
               "stream_wait_event", "events", "ipc_parent", "ipc_child"]
NVSHMEM_CASES = ["nvshmem_ptr_modes", "nvshmem_put_in_flight_until_quiet", "nvshmem_ordering", "nvshmem_private_source",
                 "nvshmem_asymmetric_malloc"]
CASE_TIMEOUT_S = 60


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Cases:
    """The built executable and the source lines its fault reports must name."""

    def __init__(self, exe: Path):
        self.exe = exe
        self.tags: dict[str, str] = {}
        for source in sorted(CASES_DIR.glob("*.cu")):
            for number, line in enumerate(source.read_text().splitlines(), start=1):
                match = re.search(r"//\s*@tag\s+(\w+)\s*$", line)
                if match:
                    assert match.group(1) not in self.tags, f"tag {match.group(1)} used twice"
                    self.tags[match.group(1)] = f"{source.name}:{number}"

    def run(self, *args: str, schedule: str | None = None, env: dict[str, str] | None = None,
            timeout: float = CASE_TIMEOUT_S) -> subprocess.CompletedProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EP_COMM_EMU_")}
        if schedule is not None:
            full_env["EP_COMM_EMU_SCHEDULE"] = schedule
        full_env.update(env or {})
        no_core = lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # noqa: E731  (SIGSEGV cases)
        return subprocess.run([str(self.exe), *args], capture_output=True, text=True, env=full_env,
                              timeout=timeout, preexec_fn=no_core)


@pytest.fixture(scope="session")
def cases(tmp_path_factory) -> Cases:
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler found (CXX, g++, c++ or clang++): the emulated device's tests compile kernels")
    build = tmp_path_factory.mktemp("emulator_device")
    sources = sorted(CASES_DIR.glob("*.cu")) + EMULATOR_SOURCES

    def compile_one(source: Path) -> Path:
        obj = build / (source.name + ".o")
        proc = subprocess.run([cxx, *CXX_FLAGS, "-c", str(source), "-o", str(obj)], capture_output=True, text=True,
                              cwd=ROOT)
        assert proc.returncode == 0, f"compiling {source}:\n{proc.stderr}"
        return obj

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        objects = list(pool.map(compile_one, sources))
    exe = build / "emulator_device_cases"
    proc = subprocess.run([cxx, *map(str, objects), "-pthread", "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, f"linking:\n{proc.stderr}"
    return Cases(exe)


def _describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}"


def _passed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("PASS"), _describe(proc)


def _fault(proc: subprocess.CompletedProcess) -> str:
    """The report a fault case got from cudaDeviceSynchronize / cudaGetErrorString."""
    _passed(proc)
    assert "sync cudaErrorLaunchFailure" in proc.stdout, _describe(proc)
    match = re.search(r"MESSAGE_BEGIN\n(.*?)\nMESSAGE_END", proc.stdout, re.S)
    assert match, _describe(proc)
    return match.group(1)


def _contains(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"expected {part!r} in the report:\n{message}"


def test_every_case_is_exercised(cases):
    listed = set(cases.run("--list").stdout.split())
    assert listed == set(CORRECT_CASES + FAULT_CASES + OTHER_CASES + NVSHMEM_CASES)


# ---- correct programs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CORRECT_CASES)
def test_correct_program_same_under_every_schedule(cases, case):
    """Each case checks its results against a host reference; its digest must not depend on the schedule."""
    results = {}
    for schedule in SCHEDULES:
        proc = cases.run(case, schedule=schedule)
        _passed(proc)
        results[schedule] = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert results[schedule], _describe(proc)
    assert len({tuple(r) for r in results.values()}) == 1, results


def test_grid_barrier_over_many_blocks(cases):
    proc = cases.run("grid_barrier", "128", schedule="random:3")
    _passed(proc)
    assert "blocks 128" in proc.stdout


def _orders(proc: subprocess.CompletedProcess) -> list[list[int]]:
    _passed(proc)
    return [[int(t) for t in line.split()[1:]] for line in proc.stdout.splitlines() if line.startswith("ORDER")]


def test_schedules_are_honoured(cases):
    """The order threads of a block first run in, and after a __syncthreads, follows EP_COMM_EMU_SCHEDULE."""
    threads = list(range(64))
    forward = _orders(cases.run("schedule_probe", schedule="forward"))
    assert forward[0] == threads
    assert _orders(cases.run("schedule_probe"))[0] == threads  # forward by default
    reverse = _orders(cases.run("schedule_probe", schedule="reverse"))
    assert reverse[0] == threads[::-1]
    random1 = _orders(cases.run("schedule_probe", schedule="random:1"))
    random2 = _orders(cases.run("schedule_probe", schedule="random:2"))
    for orders in (random1, random2):
        assert all(sorted(order) == threads for order in orders)
        # the first pass is shuffled too, not only the passes after a switch
        assert orders[0] not in (threads, threads[::-1])
        assert orders[1][1:] not in (threads[1:], threads[:-1], threads[::-1][1:], threads[::-1][:-1])
    assert random1 != random2
    assert _orders(cases.run("schedule_probe", schedule="random:1")) == random1  # a seed replays


# ---- faults -----------------------------------------------------------------------------------------------


def test_deadlock_names_each_warp_and_where_it_waits(cases):
    message = _fault(cases.run("deadlock"))
    t = cases.tags
    _contains(message, "ep_comm emulated device: deadlock (no thread of the block can move)",
              "kernel deadlock_kernel, block (1,0,0) of grid (2,1,1) (64 threads)",
              f"threads 0-31: waits in bar.sync at {t['deadlock_warp0']} (barrier 1: 32 of 64 threads arrived)",
              f"threads 32-63: waits in bar.sync at {t['deadlock_warp1']} (barrier 2: 32 of 64 threads arrived)")
    assert "block (0,0,0)" not in message


def test_divergent_collective_a_lane_skips_a_shuffle(cases):
    message = _fault(cases.run("divergent_skip"))
    t = cases.tags
    _contains(message, "divergent warp collective",
              f"lane 7 calls __syncwarp at {t['skip_syncwarp']} with mask 0xffffffff",
              f"lanes 0x7f wait in __shfl_sync at {t['skip_shfl']} with mask 0xffffffff",
              "kernel skipped_shuffle_kernel, block (0,0,0) of grid (1,1,1) (64 threads), "
              "thread (7,0,0) (warp 0 lane 7)")


def test_divergent_collective_different_masks(cases):
    message = _fault(cases.run("divergent_mask"))
    t = cases.tags
    _contains(message, "divergent warp collective",
              f"lane 5 calls __ballot_sync at {t['mask_lane5']} with mask 0x3f",
              f"lanes 0x1f wait in __ballot_sync at {t['mask_others']} with mask 0xffffffff",
              "kernel divergent_mask_kernel, block (1,0,0) of grid (2,1,1) (64 threads), "
              "thread (37,0,0) (warp 1 lane 5)")


def test_divergent_collective_a_lane_exits(cases):
    message = _fault(cases.run("divergent_exit"))
    _contains(message, "deadlock", "divergent warp collective",
              "kernel exited_lane_kernel, block (0,0,0) of grid (1,1,1) (32 threads)",
              f"threads 0-30: waits in __shfl_sync at {cases.tags['exit_shfl']} "
              "(mask 0xffffffff, lanes arrived 0x7fffffff)",
              "thread 31: exited")


def test_named_barrier_count_mismatch(cases):
    message = _fault(cases.run("barrier_mismatch"))
    t = cases.tags
    _contains(message, "barrier 1 count mismatch",
              f"this thread waits for 96 threads in bar.sync at {t['mismatch_96']}",
              f"thread 0 waits for 64 threads in bar.sync at {t['mismatch_64']}",
              "kernel barrier_mismatch_kernel, block (2,0,0) of grid (3,1,1) (128 threads), "
              "thread (32,0,0) (warp 1 lane 0)")


def test_named_barrier_count_not_a_warp_multiple(cases):
    message = _fault(cases.run("barrier_not_warp_multiple"))
    _contains(message, "named barrier 3 with a thread count of 48", "multiple of 32",
              f"bar.sync at {cases.tags['count_48']}",
              "kernel barrier_not_warp_multiple_kernel, block (0,0,0) of grid (1,1,1) (64 threads), "
              "thread (0,0,0) (warp 0 lane 0)")


def test_trap(cases):
    message = _fault(cases.run("trap"))
    _contains(message, f"__trap() at {cases.tags['trap']} [kernel trap_kernel, block (2,0,0) of grid (4,1,1) "
                       "(64 threads), thread (37,0,0) (warp 1 lane 5)]")


@pytest.mark.parametrize("schedule", ["reverse", "random:1", "random:2"])
def test_faults_found_under_other_schedules(cases, schedule):
    """Which thread trips a fault depends on the schedule; that and where it is do not."""
    t = cases.tags
    _contains(_fault(cases.run("deadlock", schedule=schedule)), "deadlock", "block (1,0,0)",
              t["deadlock_warp0"], t["deadlock_warp1"])
    _contains(_fault(cases.run("divergent_skip", schedule=schedule)), "divergent warp collective",
              "lane 7 calls __syncwarp", t["skip_syncwarp"], t["skip_shfl"])
    _contains(_fault(cases.run("divergent_mask", schedule=schedule)), "divergent warp collective", "block (1,0,0)",
              "warp 1 lane", "0x3f", t["mask_lane5"], t["mask_others"])
    _contains(_fault(cases.run("barrier_mismatch", schedule=schedule)), "barrier 1 count mismatch", "block (2,0,0)",
              t["mismatch_64"], t["mismatch_96"])


def test_hang_reported_after_the_hang_limit(cases):
    start = time.monotonic()
    proc = cases.run("hang", env={"EP_COMM_EMU_HANG_S": "1"}, timeout=30)
    elapsed = time.monotonic() - start
    message = _fault(proc)
    address = re.search(r"FLAG_ADDRESS (\S+)", proc.stdout).group(1)
    _contains(message, "hang (", "kernel hang_kernel, block (1,0,0) of grid (2,1,1) (64 threads)",
              f"thread 0: spins in ld_acquire_sys at {cases.tags['hang_spin']} on address {address}",
              f"threads 1-63: waits in __syncthreads at {cases.tags['hang_sync']} "
              "(barrier 0: 63 of 64 threads arrived)")
    assert 1.0 <= elapsed < 10.0, f"the hang was reported after {elapsed:.1f} s with EP_COMM_EMU_HANG_S=1"


def test_fault_is_sticky(cases):
    """After a fault nothing more runs, and every synchronisation returns the first fault's report."""
    proc = cases.run("sticky_fault")
    message = _fault(proc)
    _contains(message, f"__trap() at {cases.tags['trap']}", "kernel trap_kernel")
    assert "deadlock" not in message
    assert "flag 1" in proc.stdout


def test_launch_refusals_are_not_sticky(cases):
    proc = cases.run("launch_refusal")
    _passed(proc)
    # 5 bad shapes, 48 KiB + 16 without the attribute, above the raised limit, another kernel
    assert proc.stderr.count("refused") == 8, proc.stderr
    _contains(proc.stderr, "launch of counting_kernel refused: grid (1,1,1), block (1025,1,1)",
              "launch of shared_hungry_kernel refused", "(limit 49152 for this kernel)",
              "(limit 98304 for this kernel)")


# ---- runtime -------------------------------------------------------------------------------------------------


def test_write_past_allocation_hits_the_guard_page(cases):
    proc = cases.run("guard_page")
    assert proc.returncode == -signal.SIGSEGV, _describe(proc)
    assert "last element written" in proc.stdout
    assert "did not fault" not in proc.stdout


@pytest.mark.parametrize("case", ["fresh_memory", "stream_order", "stream_wait_event", "events"])
def test_runtime(cases, case):
    _passed(cases.run(case))


def test_ipc_between_processes(cases):
    """The parent's handle, on a child's argv: the child reads the parent's data, the parent its writes."""
    proc = cases.run("ipc_parent")
    if "forbids /proc/<pid>/fd access" in proc.stderr:
        pytest.skip("this container forbids opening another process's /proc/<pid>/fd: " + proc.stderr.strip())
    _passed(proc)
    assert re.search(r"^handle [0-9a-f]{128}$", proc.stdout, re.M), proc.stdout
    _contains(proc.stdout, "child read the parent's data and wrote its own", "parent sees the child's writes")


# ---- the emulated NVSHMEM ---------------------------------------------------------------------------------


def test_nvshmem_ptr_maps_peers_unless_p2p_is_disabled(cases):
    assert "p2p 1" in cases.run("nvshmem_ptr_modes").stdout
    proc = cases.run("nvshmem_ptr_modes", env={"NVSHMEM_DISABLE_P2P": "1"})
    _passed(proc)
    assert "p2p 0" in proc.stdout


def test_nvshmem_put_stays_in_flight_and_reads_its_source_late(cases):
    _passed(cases.run("nvshmem_put_in_flight_until_quiet", env={"EP_COMM_EMU_NVSHMEM_DELAY_US": "-1"}))


def test_nvshmem_delivery_reorders_what_nvshmem_does_not_order(cases):
    """Fences and put-with-signal order delivery; without them the emulated network reorders."""
    proc = cases.run("nvshmem_ordering", "300", env={"EP_COMM_EMU_NVSHMEM_DELAY_US": "500"})
    _passed(proc)
    print(proc.stdout)


def test_nvshmem_put_from_private_memory_is_a_fault(cases):
    message = _fault(cases.run("nvshmem_private_source"))
    _contains(message, "NVSHMEM: put of 64 bytes to PE 1: the source is not inside one symmetric allocation",
              cases.tags["private_source_put"])


def test_nvshmem_malloc_refuses_different_sizes(cases):
    proc = cases.run("nvshmem_asymmetric_malloc")
    _passed(proc)
    assert "nvshmem_malloc is collective with the same argument on every PE" in proc.stderr, _describe(proc)
