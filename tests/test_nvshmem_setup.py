"""NVSHMEM set-up without NVSHMEM: the environment defaults, the checks that keep NVSHMEM from ending
the process, and the agreement that makes every rank raise together (ep_comm/backends/nvshmem.py).

A fake `C` stands in for ep_comm._C's nvshmem_* functions, with the C++ runtime's rules (a failed
initialisation is recorded for the process; abandon gives back the reference and finalises only
when told); the all-gathers are real, over gloo ranks.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from typing import List, Optional

import pytest
import torch

from dist import run_ranks
from ep_comm import _ext
from ep_comm.backends import nvshmem
from ep_comm.backends.base import BackendContext
from ep_comm.backends.nvshmem import Preflight

ROOT_ID = bytes(range(128))


def make_ctx(group=None, rank: int = 0, num_ranks: int = 4, ranks_per_node: Optional[int] = None,
             low_latency_mode: bool = True, allow_nvlink: bool = True, num_rdma_bytes: int = 1 << 20,
             num_nvl_bytes: int = 0) -> BackendContext:
    return BackendContext(group=group, rank=rank, num_ranks=num_ranks,
                          ranks_per_node=num_ranks if ranks_per_node is None else ranks_per_node,
                          device=torch.device("cpu"), buffer_id=0, num_nvl_bytes=num_nvl_bytes,
                          num_rdma_bytes=num_rdma_bytes, low_latency_mode=low_latency_mode, num_qps_per_rank=4,
                          allow_nvlink_for_low_latency_mode=allow_nvlink, allow_mnnvl=False, timeout_s=30.0)


class FakeC:
    """ep_comm._C's NVSHMEM functions, as nvshmem_runtime.cpp behaves, without NVSHMEM. `calls` logs
    what reached "NVSHMEM"; acquire_error makes nvshmem_acquire fail (up_after_error: NVSHMEM came up
    anyway, as on a PE-numbering mismatch)."""

    def __init__(self, *, references: int = 0, devices: int = 1, version: str = "3.8.0", id_bytes: int = 128,
                 root_id: bytes = ROOT_ID, unique_id_error: Optional[str] = None,
                 acquire_error: Optional[str] = None, up_after_error: bool = False, failure: str = "") -> None:
        self.references = references
        self.up = references > 0
        self.devices = devices
        self.version = version
        self.id_bytes = id_bytes
        self.root_id = root_id
        self.unique_id_error = unique_id_error
        self.acquire_error = acquire_error
        self.up_after_error = up_after_error
        self.failure = failure
        self.calls: List[tuple] = []

    def nvshmem_reference_count(self) -> int:
        return self.references

    def nvshmem_init_failure(self) -> str:
        return self.failure

    def device_count(self) -> int:
        return self.devices

    def nvshmem_version(self) -> str:
        return self.version

    def nvshmem_unique_id_bytes(self) -> int:
        return self.id_bytes

    def nvshmem_get_unique_id(self) -> bytes:
        self.calls.append(("get_unique_id",))
        if self.unique_id_error:
            raise RuntimeError(self.unique_id_error)
        return self.root_id

    def nvshmem_acquire(self, unique_id: bytes, rank: int, num_ranks: int, device: int, group_key: str) -> None:
        self.calls.append(("acquire", unique_id, rank, num_ranks, device, group_key))
        if self.failure:
            raise RuntimeError(f"failed earlier in this process: {self.failure}")
        if self.acquire_error:
            if self.references == 0:
                self.failure = self.acquire_error
                self.up = self.up_after_error
            raise RuntimeError(self.acquire_error)
        self.up = True
        self.references += 1

    def nvshmem_initialised_here(self) -> bool:
        return self.references > 0 or self.up

    def nvshmem_abandon(self, reason: str, finalize: bool) -> None:
        self.calls.append(("abandon", finalize))
        if self.references > 0:
            assert self.references == 1, "abandon with other references alive"
            self.references = 0
            self.up = True
        self.failure = self.failure or reason
        if finalize and self.up:
            self.calls.append(("finalize",))
            self.up = False

    def nvshmem_release(self) -> None:
        self.calls.append(("release",))
        self.references -= 1
        if self.references == 0:
            self.calls.append(("finalize",))
            self.up = False

    def called(self, name: str) -> List[tuple]:
        return [c for c in self.calls if c[0] == name]


@pytest.fixture
def clean_env(monkeypatch):
    """os.environ without NVSHMEM_* variables; monkeypatch restores the real one afterwards."""
    for name in list(os.environ):
        if name.startswith("NVSHMEM_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _clear_nvshmem_env() -> None:
    for name in list(os.environ):
        if name.startswith("NVSHMEM_"):
            del os.environ[name]


# ---- environment ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("1073741824", 1 << 30), ("1G", 1 << 30), ("1g", 1 << 30), ("512M", 512 << 20), ("2k", 2048),
    ("1.5G", 3 << 29), ("3T", 3 << 40), ("0", 0),
    ("", None), ("abc", None), ("1 G", None), (" 1G", None), ("1GB", None), ("-1", None), ("1e9", None),
    ("0x100", None), ("G", None), ("1.G", None), ("1P", None),
])
def test_parse_size_accepts_only_what_nvshmem_reads_the_same_way(value, expected):
    assert nvshmem.parse_size(value) == expected


def test_check_environment_names_malformed_and_zero_sizes(clean_env):
    assert nvshmem.check_environment() == []
    assert nvshmem.check_environment({"NVSHMEM_SYMMETRIC_SIZE": "2G", "NVSHMEM_FCOLLECT_LL128_THRESHOLD": "0",
                                      "NVSHMEM_DEBUG": "INFO", "OTHER_SIZE": "garbage"}) == []
    problems = nvshmem.check_environment({"NVSHMEM_SYMMETRIC_SIZE": "1 G", "NVSHMEM_CUMEM_GRANULARITY": "0",
                                          "NVSHMEM_FCOLLECT_LL_THRESHOLD": "2KiB"})
    assert len(problems) == 3
    assert "NVSHMEM_SYMMETRIC_SIZE='1 G'" in problems[0] and "2G" in problems[0]
    assert "NVSHMEM_CUMEM_GRANULARITY='0' must be positive" in problems[1]
    assert "NVSHMEM_FCOLLECT_LL_THRESHOLD='2KiB'" in problems[2]
    clean_env.setenv("NVSHMEM_SYMMETRIC_SIZE", "lots")
    assert "NVSHMEM_SYMMETRIC_SIZE='lots'" in nvshmem.check_environment()[0]


@pytest.mark.parametrize("value, expected", [
    (None, False), ("1", True), ("true", True), ("yes", True), ("", True), ("off", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("N", False),
])
def test_nvshmem_bool_reads_like_nvshmem(value, expected):
    assert nvshmem.nvshmem_bool(value) is expected


def test_single_node_with_p2p_defaults_remote_transport_to_none(clean_env):
    for ctx in (make_ctx(), make_ctx(low_latency_mode=False, num_nvl_bytes=1 << 20)):
        _clear_nvshmem_env()
        set_here = nvshmem.configure_environment(ctx, FakeC())
        assert os.environ["NVSHMEM_REMOTE_TRANSPORT"] == "none"
        assert "NVSHMEM_DISABLE_P2P" not in os.environ
        assert set_here == {"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_DISABLE_NVLS": "1",
                            "NVSHMEM_DISABLE_NCCL": "1"}


def test_single_node_without_p2p_leaves_the_remote_transport_alone(clean_env):
    # allow_nvlink_for_low_latency_mode=False disables P2P: peers are reached only by the remote transport.
    set_here = nvshmem.configure_environment(make_ctx(allow_nvlink=False), FakeC())
    assert os.environ["NVSHMEM_DISABLE_P2P"] == "1"
    assert "NVSHMEM_REMOTE_TRANSPORT" not in os.environ and "NVSHMEM_REMOTE_TRANSPORT" not in set_here
    # So does the user's own NVSHMEM_DISABLE_P2P, however NVSHMEM spells true.
    for value in ("1", "yes", "TRUE"):
        _clear_nvshmem_env()
        clean_env.setenv("NVSHMEM_DISABLE_P2P", value)
        nvshmem.configure_environment(make_ctx(), FakeC())
        assert "NVSHMEM_REMOTE_TRANSPORT" not in os.environ, value
    # The user's explicit NVSHMEM_DISABLE_P2P=0 wins over allow_nvlink=False: P2P stays on.
    _clear_nvshmem_env()
    clean_env.setenv("NVSHMEM_DISABLE_P2P", "0")
    nvshmem.configure_environment(make_ctx(allow_nvlink=False), FakeC())
    assert os.environ["NVSHMEM_DISABLE_P2P"] == "0" and os.environ["NVSHMEM_REMOTE_TRANSPORT"] == "none"


def test_remote_transport_is_the_users_and_several_nodes_keep_nvshmems_default(clean_env):
    clean_env.setenv("NVSHMEM_REMOTE_TRANSPORT", "ibrc")
    assert "NVSHMEM_REMOTE_TRANSPORT" not in nvshmem.configure_environment(make_ctx(), FakeC())
    assert os.environ["NVSHMEM_REMOTE_TRANSPORT"] == "ibrc"
    _clear_nvshmem_env()
    nvshmem.configure_environment(make_ctx(num_ranks=4, ranks_per_node=2), FakeC())
    assert "NVSHMEM_REMOTE_TRANSPORT" not in os.environ
    # Already initialised in this process: its settings are fixed, nothing is set.
    _clear_nvshmem_env()
    assert nvshmem.configure_environment(make_ctx(), FakeC(references=1)) == {}
    assert not [n for n in os.environ if n.startswith("NVSHMEM_")]


def test_other_defaults_heap_size_and_ibgda(clean_env):
    clean_env.setenv("NVSHMEM_IB_ENABLE_IBGDA", "1")
    set_here = nvshmem.configure_environment(make_ctx(num_rdma_bytes=3 << 30), FakeC())
    assert set_here["NVSHMEM_IBGDA_NUM_RC_PER_PE"] == "4"
    heap = int(set_here["NVSHMEM_SYMMETRIC_SIZE"])
    assert heap >= (3 << 30) + nvshmem.HEAP_HEADROOM and heap % (2 << 20) == 0
    assert nvshmem.check_environment() == []
    _clear_nvshmem_env()
    clean_env.setenv("NVSHMEM_SYMMETRIC_SIZE", "8G")  # the user's size wins
    assert "NVSHMEM_SYMMETRIC_SIZE" not in nvshmem.configure_environment(make_ctx(num_rdma_bytes=3 << 30), FakeC())


# ---- the verdicts (plain functions of the gathered records) ---------------------------------------

def preflights(n: int = 3, **changes) -> List[Preflight]:
    """n agreeing records; changes={rank: {field: value}} alters some."""
    out = []
    for r in range(n):
        fields = dict(rank=r, num_ranks=n, group_key=",".join(map(str, range(n))), initialized=False,
                      nvshmem_version="3.8.0", unique_id_bytes=128, host="node0", remote_transport_none=True,
                      problem=None)
        fields.update(changes.get(str(r), {}))
        out.append(Preflight(**fields))
    return out


def test_agreement_error_names_the_ranks_at_fault():
    assert nvshmem.agreement_error(preflights()) is None
    msg = nvshmem.agreement_error(preflights(**{"1": dict(problem="device index 5 does not exist"),
                                                "2": dict(problem="NVSHMEM_SYMMETRIC_SIZE='x' ...")}))
    assert msg.startswith("NVSHMEM set-up refused on every rank")
    assert "rank 1: device index 5" in msg and "rank 2: NVSHMEM_SYMMETRIC_SIZE" in msg
    msg = nvshmem.agreement_error(preflights(**{"2": dict(num_ranks=4)}))
    assert "the group has 3 ranks" in msg and "rank 2 calls itself 2 of 4" in msg
    msg = nvshmem.agreement_error(preflights(**{"0": dict(rank=1)}))
    assert "rank 0 calls itself 1 of 3" in msg
    msg = nvshmem.agreement_error(preflights(**{"1": dict(group_key="0,2,1")}))
    assert "disagree on the group's members" in msg and "ranks [1] have [0,2,1]" in msg
    msg = nvshmem.agreement_error(preflights(**{"0": dict(initialized=True)}))
    assert "ranks [0] already initialised NVSHMEM" in msg
    msg = nvshmem.agreement_error(preflights(**{"2": dict(nvshmem_version="3.5.1")}))
    assert "different NVSHMEM builds" in msg and "ranks [2] have 3.5.1" in msg
    msg = nvshmem.agreement_error(preflights(**{"2": dict(host="node1")}))
    assert "NVSHMEM_REMOTE_TRANSPORT=none" in msg and "2 hosts" in msg and "EP_COMM_RANKS_PER_NODE" in msg
    # Several hosts are fine where the remote transport was left to NVSHMEM (or the user).
    spread = {str(r): dict(host=f"node{r}", remote_transport_none=False) for r in range(3)}
    assert nvshmem.agreement_error(preflights(**spread)) is None
    # Already initialised everywhere: versions and hosts no longer matter (nothing is initialised).
    done = {"0": dict(initialized=True), "1": dict(initialized=True, nvshmem_version="x"),
            "2": dict(initialized=True, host="node1")}
    assert nvshmem.agreement_error(preflights(**done)) is None


def test_unique_id_error():
    everyone = preflights()
    assert nvshmem.unique_id_error(everyone, (ROOT_ID, None)) is None
    assert "rank 0" in nvshmem.unique_id_error(everyone, (None, "creating the NVSHMEM unique id failed: boom"))
    msg = nvshmem.unique_id_error(preflights(**{"1": dict(unique_id_bytes=64)}), (ROOT_ID, None))
    assert "128 bytes, but ranks [1] expect 64" in msg
    assert "ranks [0, 1, 2] expect 128" in nvshmem.unique_id_error(everyone, (ROOT_ID[:8], None))


def test_outcome_error():
    assert nvshmem.outcome_error([(None, True)] * 3) is None
    msg = nvshmem.outcome_error([(None, True), ("status 7 on rank 1", False), (None, True)])
    assert msg.startswith("NVSHMEM initialisation failed on ranks [1] of 3: rank 1: status 7 on rank 1")
    assert "came up on ranks [0, 2]" in msg
    msg = nvshmem.outcome_error([("PE 1 of 2, expected 0", True), ("PE 0 of 2, expected 1", True)])
    assert "ranks [0, 1] of 2" in msg and "came up" not in msg


# ---- acquire over gloo ranks, with a fake C -------------------------------------------------------

def _refused_everywhere(ctx: BackendContext, C: FakeC, device_index: int, *expected: str,
                        id_created: bool = False) -> str:
    """acquire must raise on this rank with `expected` in the message, and touch no NVSHMEM (but
    rank 0's unique id, where `id_created`: the checks of the id come after it)."""
    with pytest.raises(RuntimeError) as info:
        nvshmem.acquire(ctx, C, device_index)
    msg = str(info.value)
    for text in expected:
        assert text in msg, (text, msg)
    assert C.called("get_unique_id") == ([("get_unique_id",)] if id_created and ctx.rank == 0 else [])
    assert C.called("acquire") == [], C.calls
    assert "NVSHMEM_REMOTE_TRANSPORT" not in os.environ, "defaults of a refused set-up must be rolled back"
    return msg


def _before_init_body(rank: int, world: int, group) -> None:
    last = world - 1
    # Every check passes: rank 0's id reaches every rank, and NVSHMEM gets it.
    _clear_nvshmem_env()
    C = FakeC()
    nvshmem.acquire(make_ctx(group, rank, world), C, 0)
    assert C.called("get_unique_id") == ([("get_unique_id",)] if rank == 0 else [])
    key = ",".join(map(str, range(world)))
    assert C.called("acquire") == [("acquire", ROOT_ID, rank, world, 0, key)]
    assert os.environ["NVSHMEM_REMOTE_TRANSPORT"] == "none"
    # A second Buffer takes another reference: no new id.
    nvshmem.acquire(make_ctx(group, rank, world), C, 0)
    assert C.references == 2 and C.called("acquire")[1][1] == b""

    # A device that does not exist on the last rank: every rank raises, naming it.
    _clear_nvshmem_env()
    _refused_everywhere(make_ctx(group, rank, world), FakeC(devices=2), 3 if rank == last else 0,
                        f"rank {last}: device index 3 does not exist (this process sees 2 CUDA devices")
    # A malformed NVSHMEM_SYMMETRIC_SIZE on rank 1 only (it would crash rank 0 in get_unique_id).
    _clear_nvshmem_env()
    if rank == 1:
        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = "1 G"
    _refused_everywhere(make_ctx(group, rank, world), FakeC(), 0, "rank 1: NVSHMEM_SYMMETRIC_SIZE='1 G'")
    assert rank != 1 or os.environ["NVSHMEM_SYMMETRIC_SIZE"] == "1 G"  # the user's own setting stays
    _clear_nvshmem_env()
    # Rank and size out of range / disagreeing.
    _refused_everywhere(make_ctx(group, rank + 5 if rank == 1 else rank, world), FakeC(), 0,
                        f"rank 1: rank 6 is not in [0, num_ranks={world})")
    _refused_everywhere(make_ctx(group, rank, world + 1 if rank == last else world), FakeC(), 0,
                        f"the group has {world} ranks", f"rank {last} calls itself {last} of {world + 1}")
    # A failed initialisation recorded on rank 1: nobody starts a bootstrap rank 1 would not join.
    _refused_everywhere(make_ctx(group, rank, world), FakeC(failure="status 7" if rank == 1 else ""), 0,
                        "rank 1: ep_comm's NVSHMEM initialisation failed earlier in this process (status 7)",
                        "restart")
    # Another NVSHMEM build on the last rank.
    _refused_everywhere(make_ctx(group, rank, world), FakeC(version="3.5.1" if rank == last else "3.8.0"), 0,
                        "different NVSHMEM builds", f"ranks [{last}] have 3.5.1")
    # Rank 0 cannot create the id, or creates one of another size.
    _refused_everywhere(make_ctx(group, rank, world), FakeC(unique_id_error="no interface"), 0,
                        "NVSHMEM set-up failed on rank 0, for every rank: creating the NVSHMEM unique id failed: "
                        "no interface", id_created=True)
    _refused_everywhere(make_ctx(group, rank, world), FakeC(root_id=ROOT_ID[:64] if rank == 0 else ROOT_ID), 0,
                        "rank 0's unique id has 64 bytes", id_created=True)
    # NVSHMEM held by rank 0 only.
    _refused_everywhere(make_ctx(group, rank, world), FakeC(references=1 if rank == 0 else 0), 0,
                        "ranks [0] already initialised NVSHMEM")


def test_acquire_refuses_on_every_rank_before_nvshmem_sees_bad_input():
    run_ranks(_before_init_body, 3)


def _after_init_body(rank: int, world: int, group) -> None:
    # Initialisation fails on rank 1 (NVSHMEM half bootstrapped there), succeeds elsewhere: every rank
    # raises naming rank 1; nobody finalises (rank 1 could not join); the failure sticks everywhere.
    _clear_nvshmem_env()
    C = FakeC(acquire_error="NVSHMEM initialisation failed with status 7" if rank == 1 else None)
    with pytest.raises(RuntimeError, match=r"NVSHMEM initialisation failed on ranks \[1\] of 3: rank 1: NVSHMEM initia"
                                           r"lisation failed with status 7 \(NVSHMEM came up on ranks \[0, 2\]\)"):
        nvshmem.acquire(make_ctx(group, rank, world), C, 0)
    assert C.called("abandon") == [("abandon", False)] and C.called("finalize") == []
    assert C.references == 0 and C.up == (rank != 1)
    calls = len(C.calls)
    with pytest.raises(RuntimeError, match="rank 1: ep_comm's NVSHMEM initialisation failed earlier in this process "
                                           r"\(NVSHMEM initialisation failed with status 7\).*restart"):
        nvshmem.acquire(make_ctx(group, rank, world), C, 0)
    assert len(C.calls) == calls, C.calls[calls:]  # refused before any NVSHMEM call

    # NVSHMEM came up everywhere but wrong on rank 0 (PE numbering): all finalise it together.
    _clear_nvshmem_env()
    C = FakeC(acquire_error="NVSHMEM came up as PE 2 of 3" if rank == 0 else None, up_after_error=True)
    with pytest.raises(RuntimeError, match=r"failed on ranks \[0\] of 3: rank 0: NVSHMEM came up as PE 2 of 3$"):
        nvshmem.acquire(make_ctx(group, rank, world), C, 0)
    assert C.called("abandon") == [("abandon", True)] and C.called("finalize") == [("finalize",)]
    assert C.references == 0 and not C.up and C.failure

    # Already initialised everywhere; the new reference fails on the last rank: the others give theirs
    # back (not the last one: no finalize), and nobody abandons NVSHMEM the older Buffers still use.
    C = FakeC(references=1)
    if rank == world - 1:
        C.acquire_error = "a low-latency Buffer over the group [2,1,0] cannot share it"
    with pytest.raises(RuntimeError, match=rf"failed on ranks \[{world - 1}\] of 3: .*cannot share it"):
        nvshmem.acquire(make_ctx(group, rank, world), C, 0)
    assert C.references == 1 and C.called("abandon") == [] and C.called("finalize") == []
    assert C.called("release") == ([] if rank == world - 1 else [("release",)])
    assert C.failure == ""


def test_acquire_agrees_on_the_outcome_and_finalises_only_all_together():
    run_ranks(_after_init_body, 3)


# ---- the C++ record of a failed initialisation (the real runtime; no GPU, NVSHMEM never starts) ------

_RECORD_SCRIPT = r"""
import importlib, sys
from ep_comm import _ext
C = _ext.load() if sys.argv[1] == "ep_comm._C" else importlib.import_module(sys.argv[1])
def raises(text, *args):
    try:
        C.nvshmem_acquire(*args)
    except RuntimeError as e:
        assert text in str(e), (text, str(e))
        return str(e)
    raise AssertionError(f"nvshmem_acquire{args[1:]} did not raise")
assert C.nvshmem_init_failure() == "" and not C.nvshmem_initialised_here() and C.nvshmem_reference_count() == 0
good_id = bytes(C.nvshmem_unique_id_bytes())
# Bad arguments touch nothing: raised, not recorded.
raises("NVSHMEM unique id must be", b"short", 0, 1, 0, "0")
raises("rank 2 is not in [0, 2)", good_id, 2, 2, 0, "0,1")
assert C.nvshmem_init_failure() == ""
# A failed initialisation (here: abandoned after a peer failed) sticks for the process.
C.nvshmem_abandon("NVSHMEM initialisation failed on ranks [1] of 2", False)
assert C.nvshmem_init_failure() == "NVSHMEM initialisation failed on ranks [1] of 2"
assert not C.nvshmem_initialised_here() and C.nvshmem_reference_count() == 0
msg = raises("ep_comm's NVSHMEM initialisation failed earlier in this process: NVSHMEM initialisation failed on "
             "ranks [1] of 2. NVSHMEM cannot be initialised again in this process: restart", good_id, 0, 1, 0, "0")
assert "another library" not in msg
C.nvshmem_abandon("a second reason", True)  # nothing up here: nothing to finalise, first reason kept
assert C.nvshmem_init_failure() == "NVSHMEM initialisation failed on ranks [1] of 2"
print("ok")
"""


def _runtime_modules():
    found = []
    if _ext.load() is not None:
        found.append("ep_comm._C")
    try:
        emu = importlib.import_module("ep_comm._C_emu")
        if hasattr(emu, "nvshmem_abandon"):
            found.append("ep_comm._C_emu")
    except ImportError:
        pass
    return found or [pytest.param(None, marks=pytest.mark.skip(reason="neither ep_comm._C nor an ep_comm._C_emu "
                                                                       "with NVSHMEM is built"))]


@pytest.mark.parametrize("module", _runtime_modules())
def test_runtime_records_a_failed_initialisation_for_the_process(module):
    # A fresh process: the record cannot be undone.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _RECORD_SCRIPT, module], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


# ---- acquire end to end on the emulated NVSHMEM (ep_comm._C_emu): real C++ runtime, real bootstrap ----

def _emulated_nvshmem():
    try:
        emu = importlib.import_module("ep_comm._C_emu")
    except ImportError:
        return None
    return emu if hasattr(emu, "nvshmem_abandon") else None


def _emulated_body(rank: int, world: int, group) -> None:
    C = importlib.import_module("ep_comm._C_emu")
    _clear_nvshmem_env()
    # Comes up: PEs numbered as the ranks; references counted; the last release finalises.
    nvshmem.acquire(make_ctx(group, rank, world), C, 0)
    assert (C.nvshmem_my_pe(), C.nvshmem_n_pes(), C.nvshmem_reference_count()) == (rank, world, 1)
    nvshmem.acquire(make_ctx(group, rank, world), C, 0)
    assert C.nvshmem_reference_count() == 2 and C.nvshmem_init_failure() == ""
    C.nvshmem_release()
    C.nvshmem_release()
    assert C.nvshmem_reference_count() == 0 and not C.nvshmem_initialised_here()


def _emulated_failure_body(rank: int, world: int, group) -> None:
    C = importlib.import_module("ep_comm._C_emu")
    _clear_nvshmem_env()
    # Heaps of different sizes (each valid): the emulated NVSHMEM refuses to come up on every PE.
    os.environ["NVSHMEM_SYMMETRIC_SIZE"] = f"{64 << rank}M"
    with pytest.raises(RuntimeError, match=rf"NVSHMEM initialisation failed on ranks \[0, 1\] of {world}: rank 0: "):
        nvshmem.acquire(make_ctx(group, rank, world), C, 0)
    failure = C.nvshmem_init_failure()
    assert failure.startswith("NVSHMEM initialisation failed with status") and not C.nvshmem_initialised_here()
    assert C.nvshmem_init_status() == 1  # left bootstrapped, as NVSHMEM leaves it
    # The retry is refused on every rank before NVSHMEM is touched, naming the first failure.
    os.environ["NVSHMEM_SYMMETRIC_SIZE"] = "64M"
    with pytest.raises(RuntimeError, match="failed earlier in this process") as info:
        nvshmem.acquire(make_ctx(group, rank, world), C, 0)
    assert failure in str(info.value) and "another library" not in str(info.value)


@pytest.mark.skipif(_emulated_nvshmem() is None, reason="ep_comm._C_emu with the emulated NVSHMEM is not built")
def test_acquire_on_the_emulated_nvshmem():
    run_ranks(_emulated_body, 3)
    run_ranks(_emulated_failure_body, 2)
