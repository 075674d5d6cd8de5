"""Fault injection on 3 gloo ranks: every live rank raises within the timeout (or succeeds), no rank
returns data from a call its peers did not make, no process aborts, and the group and the Buffer
serve the next matched call.

Each case is one spawn with a hard wall-clock bound (the parent kills what is left and fails). A
rank reports what it saw (outcome, exception type and message, seconds taken) to the parent, which
checks the promises; bodies also check received data against the loop emulator (ep_comm.testing).
EP_COMM_TIMEOUT_S is small (TIMEOUT_S), so "within the timeout" is measured in seconds.
"""
from __future__ import annotations

import datetime
import gc
import os
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ep_comm
from ep_comm import _ext
from ep_comm.config import Config
from ep_comm.testing import expected_combine, expected_dispatch, make_inputs
from dist import free_port

WORLD = 3
TIMEOUT_S = 3.0
SLACK_S = 2.0          # what "within the timeout" may add: store round trips, a loaded 2-core machine
HARD_LIMIT_S = 90.0    # per case: a spawn that is not done by then is killed and the case fails
HIDDEN = 128
NUM_EXPERTS = 2 * WORLD
SEED = 20261206

needs_emulator = pytest.mark.skipif(not _ext.emulated_available(),
                                    reason=f"ep_comm._C_emu is not built: {_ext.emulated_unavailable_reason()}")


# ---- harness ---------------------------------------------------------------------------------------
def _worker(rank: int, port: int, env: dict, body: Callable, kwargs: dict, results: Any) -> None:
    os.environ.update(env)
    os.environ["EP_COMM_TIMEOUT_S"] = str(TIMEOUT_S)
    report: Dict[str, Any] = {"rank": rank, "events": [], "error": None}
    try:
        # The group's own timeout is long: only ep_comm's bounded waits may end a call here.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=120))
        body(rank, report["events"], **kwargs)
        gc.collect()
        survivors = kwargs.get("survivors", list(range(WORLD)))
        # Leave together: rank 0 hosts the store, and gloo dislikes a peer closing mid-use. A store
        # barrier works where a peer died; a gloo barrier would wait for it.
        store = dist.distributed_c10d._get_default_store()
        for phase in ("test-exit", "test-exit-2"):
            store.add(phase, 1)
            deadline = time.monotonic() + 30
            # Rank 0 hosts the store, so it leaves only once every survivor stopped using it.
            while (phase == "test-exit" or rank == 0) and int(store.add(phase, 0)) < len(survivors):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{phase}: not every survivor arrived")
                time.sleep(0.05)
        if len(survivors) == WORLD:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        report["error"] = traceback.format_exc()
    results.put(report)


def _run(body: Callable, env: Optional[dict] = None, dead: Optional[int] = None, **kwargs) -> List[dict]:
    """Spawn WORLD ranks running body(rank, events, **kwargs); return their reports (rank order).
    Fails if a rank raised unexpectedly, died by a signal (abort), or the case overran HARD_LIMIT_S."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    if dead is not None:
        kwargs["survivors"] = [r for r in range(WORLD) if r != dead]
    procs = [ctx.Process(target=_worker, args=(r, port, env or {}, body, kwargs, results)) for r in range(WORLD)]
    start = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.0, start + HARD_LIMIT_S - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    reports = {}
    while not results.empty():
        report = results.get()
        reports[report["rank"]] = report
    codes = [p.exitcode for p in procs]
    problems = []
    if hung:
        problems.append(f"ranks {hung} still running after {HARD_LIMIT_S} s (killed)")
    for r in range(WORLD):
        if r == dead:
            continue
        if codes[r] != 0:
            problems.append(f"rank {r} exit code {codes[r]} (negative: killed by a signal, e.g. SIGABRT)")
        if r not in reports:
            problems.append(f"rank {r} reported nothing")
        elif reports[r]["error"]:
            problems.append(f"rank {r} failed:\n{reports[r]['error']}")
    if problems:
        raise AssertionError(f"{body.__name__} {kwargs} (seed {SEED}): " + "\n".join(problems))
    return [reports.get(r) for r in range(WORLD)]


class _Call:
    """Runs one call and records (label, outcome, exception type, message, seconds) in `events`."""

    def __init__(self, events: list) -> None:
        self.events = events

    def __call__(self, label: str, fn: Callable, expect: Optional[type] = None, match: str = ""):
        start = time.monotonic()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - recorded, then checked
            took = time.monotonic() - start
            self.events.append((label, "raised", type(e).__name__, str(e), took))
            if expect is None or not isinstance(e, expect) or match not in str(e):
                raise AssertionError(f"{label}: expected {expect and expect.__name__} matching {match!r}, got "
                                     f"{type(e).__name__}: {e}") from e
            return None
        took = time.monotonic() - start
        self.events.append((label, "ok", None, "", took))
        if expect is not None:
            raise AssertionError(f"{label}: expected {expect.__name__} matching {match!r}, but the call returned")
        return result


def _inputs(seed: int):
    return [make_inputs(seed, r, 6 + 2 * r, HIDDEN, 2, NUM_EXPERTS) for r in range(WORLD)]


def _good_round(rank: int, call: _Call, seed: int, buffer=None, label: str = "good", config=None) -> None:
    """A matched dispatch + combine on every rank, checked bit for bit against the loop emulator:
    through `buffer` (Buffer API) or, without one, the plain API."""
    inputs = _inputs(seed)
    mine = inputs[rank]
    if buffer is None:
        result = call(f"{label}-dispatch", lambda: ep_comm.dispatch(mine.x, mine.topk_idx, mine.topk_weights,
                                                                    num_experts=NUM_EXPERTS))
        recv_x, handle = result.recv_x, result.handle
        combine = lambda rows: ep_comm.combine(rows, handle).combined_x  # noqa: E731
    else:
        layout = call(f"{label}-layout", lambda: buffer.get_dispatch_layout(mine.topk_idx, NUM_EXPERTS))
        recv_x, _, _, _, handle, _ = call(f"{label}-dispatch", lambda: buffer.dispatch(
            mine.x, topk_idx=mine.topk_idx, topk_weights=mine.topk_weights, num_tokens_per_rank=layout[0],
            is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], config=config))
        combine = lambda rows: buffer.combine(rows, handle, config=config)[0]  # noqa: E731
    all_expected = [expected_dispatch(inputs, d, NUM_EXPERTS) for d in range(WORLD)]
    assert torch.equal(recv_x, all_expected[rank].recv_x), f"{label}: wrong rows on rank {rank} (seed {seed})"
    rows = [(e.recv_x.float() * (d + 2)).to(torch.bfloat16) for d, e in enumerate(all_expected)]
    combined = call(f"{label}-combine", lambda: combine(rows[rank]))
    want = expected_combine(all_expected, rows, rank, mine.x.shape[0])
    assert torch.equal(combined, want), f"{label}: wrong combine on rank {rank} (seed {seed})"


def _emulated_buffer():
    config = Config(num_sms=2, num_max_nvl_chunked_send_tokens=2, num_max_nvl_chunked_recv_tokens=8)
    nvl = config.get_nvl_buffer_size_hint(256 * 2, WORLD)
    return ep_comm.Buffer(num_nvl_bytes=nvl, backend="emulated"), config


def _buffer(backend: str):
    if backend == "emulated":
        return _emulated_buffer()
    return ep_comm.Buffer(backend="reference"), None


def _emulated_env() -> dict:
    # Two emulated SMs per rank keep three rank processes light on a 2-core machine.
    return {"EP_COMM_EMU_NUM_SMS": "2"}


def _timeout_error():
    return getattr(ep_comm, "EpCommTimeout", RuntimeError)


def _mismatch_error():
    return getattr(ep_comm, "EpCommMismatch", RuntimeError)


def _within_timeout(reports, label: str, ranks) -> None:
    for r in ranks:
        took = [e[4] for e in reports[r]["events"] if e[0] == label]
        assert took, f"rank {r} has no event {label}"
        assert took[0] <= TIMEOUT_S + SLACK_S, f"rank {r}: {label} took {took[0]:.1f} s (timeout {TIMEOUT_S} s)"


# ---- a bad input on one rank -----------------------------------------------------------------------
def _bad_layout_input_body(rank, events, api):
    """topk_idx out of range / int32 / wrong shape on rank 1 only: rank 1 gets its own error, the others
    an error naming rank 1; nobody blocks, and the next matched call returns the right rows."""
    call = _Call(events)
    buffer = None if api == "plain" else ep_comm.Buffer(backend="reference")
    mine = _inputs(SEED)[rank]
    bad_cases = [("out-of-range", mine.topk_idx.clone().fill_(NUM_EXPERTS)), ("int32", mine.topk_idx.int()),
                 ("shape", mine.topk_idx[:, :1].reshape(-1))]
    for name, bad in bad_cases:
        idx = bad if rank == 1 else mine.topk_idx
        expect, match = ((ValueError, TypeError), "") if rank == 1 else (_mismatch_error(), "rank(s) [1] rejected")
        if buffer is None:
            fn = lambda: ep_comm.dispatch(mine.x, idx, num_experts=NUM_EXPERTS)  # noqa: E731
        else:
            fn = lambda: buffer.get_dispatch_layout(idx, NUM_EXPERTS)  # noqa: E731
        call(f"bad-{name}", fn, expect, match)
        _good_round(rank, call, SEED + len(events), buffer, label=f"after-{name}")


@pytest.mark.parametrize("api", ["plain", "buffer"])
def test_bad_layout_input_on_one_rank(api):
    reports = _run(_bad_layout_input_body, api=api)
    _within_timeout(reports, "bad-int32", range(WORLD))


# ---- a rank that never calls -----------------------------------------------------------------------
def _never_calls_body(rank, events, backend):
    """Rank 1 sleeps past the timeout instead of dispatching. Ranks 0 and 2 raise the timeout error
    (naming rank 1 and the phase) within the timeout; rank 1's late call raises too (its peers gave
    up on it) instead of running against their next call; then a matched round works everywhere."""
    call = _Call(events)
    buffer, config = _buffer(backend)
    _good_round(rank, call, SEED, buffer, label="before", config=config)
    mine = _inputs(SEED)[rank]
    layout = buffer.get_dispatch_layout(mine.topk_idx, NUM_EXPERTS)
    kwargs = dict(topk_idx=mine.topk_idx, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                  num_tokens_per_expert=layout[2], config=config)
    if rank == 1:
        time.sleep(TIMEOUT_S + 1.5)
        call("late", lambda: buffer.dispatch(mine.x, **kwargs), _timeout_error(), "gave up")
    else:
        call("waited", lambda: buffer.dispatch(mine.x, **kwargs), _timeout_error(), "rank(s) [1]")
    _good_round(rank, call, SEED + 1, buffer, label="after", config=config)
    # The other way back: destroy on every rank and make a new Buffer.
    buffer.destroy()
    buffer, config = _buffer(backend)
    _good_round(rank, call, SEED + 2, buffer, label="recreated", config=config)
    if backend != "reference":
        return
    # The same through the plain API, then its Buffer destroyed and made again by the next call.
    _good_round(rank, call, SEED + 3, None, label="plain-before")
    if rank == 1:
        time.sleep(TIMEOUT_S + 1.5)
        call("plain-late", lambda: ep_comm.dispatch(mine.x, mine.topk_idx, num_experts=NUM_EXPERTS),
             _timeout_error(), "gave up")
    else:
        call("plain-waited", lambda: ep_comm.dispatch(mine.x, mine.topk_idx, num_experts=NUM_EXPERTS),
             _timeout_error(), "rank(s) [1]")
    _good_round(rank, call, SEED + 4, None, label="plain-after")
    ep_comm.get_buffer().destroy()
    _good_round(rank, call, SEED + 5, None, label="plain-recreated")


@pytest.mark.parametrize("backend", ["reference", pytest.param("emulated", marks=needs_emulator)])
def test_rank_that_never_calls(backend):
    reports = _run(_never_calls_body, env=_emulated_env(), backend=backend)
    _within_timeout(reports, "waited", [0, 2])
    if backend == "reference":
        _within_timeout(reports, "plain-waited", [0, 2])
    for r in (0, 2):
        message = [e[3] for e in reports[r]["events"] if e[0] == "waited"][0]
        assert f"rank {r}" in message and "dispatch" in message, message


# ---- mismatched calls ------------------------------------------------------------------------------
def _mismatch_body(rank, events):
    """Shapes or dtypes that differ on rank 1: every rank raises naming rank 1 and what differs, no
    process aborts, and the Buffer (and the plain API) serve the next matched call."""
    call = _Call(events)
    buffer = ep_comm.Buffer(backend="reference")
    inputs = _inputs(SEED)
    mine = inputs[rank]
    layout = buffer.get_dispatch_layout(mine.topk_idx, NUM_EXPERTS)
    kwargs = dict(topk_idx=mine.topk_idx, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                  num_tokens_per_expert=layout[2])
    wide = make_inputs(SEED, rank, mine.x.shape[0], 2 * HIDDEN, 2, NUM_EXPERTS).x
    x = wide if rank == 1 else mine.x
    call("hidden", lambda: buffer.dispatch(x, **kwargs), _mismatch_error(),
         f"rank 1 called dispatch with hidden={2 * HIDDEN}, ranks 0,2 with hidden={HIDDEN}")
    _good_round(rank, call, SEED + 1, buffer, label="after-hidden")
    x = ep_comm.fp8.per_token_cast_to_fp8(mine.x) if rank == 1 else mine.x
    call("fp8", lambda: buffer.dispatch(x, **kwargs), _mismatch_error(), "rank 1 called dispatch with fp8=True")
    _good_round(rank, call, SEED + 2, buffer, label="after-fp8")
    # Through the plain API: the real cause, not a Buffer-size complaint.
    x = wide if rank == 1 else mine.x
    call("plain-hidden", lambda: ep_comm.dispatch(x, mine.topk_idx, num_experts=NUM_EXPERTS), _mismatch_error(),
         f"rank 1 called ep_comm.dispatch with hidden={2 * HIDDEN}, ranks 0,2 with hidden={HIDDEN}")
    x = mine.x.float() if rank == 1 else mine.x
    expect, match = (TypeError, "bfloat16") if rank == 1 else (_mismatch_error(), "rank(s) [1] rejected")
    call("plain-float32", lambda: ep_comm.dispatch(x, mine.topk_idx, num_experts=NUM_EXPERTS), expect, match)
    _good_round(rank, call, SEED + 3, None, label="after-plain")
    # A rank that skips a call: rank 1 combines while the others dispatch.
    result = ep_comm.dispatch(mine.x, mine.topk_idx, num_experts=NUM_EXPERTS)
    if rank == 1:
        call("skip", lambda: ep_comm.combine(result.recv_x, result.handle), _mismatch_error(),
             "rank 1 called combine")
    else:
        call("skip", lambda: ep_comm.dispatch(mine.x, mine.topk_idx, num_experts=NUM_EXPERTS), _mismatch_error(),
             "rank 1 called combine, ranks 0,2 called ep_comm.dispatch")
    _good_round(rank, call, SEED + 4, None, label="after-skip")


def test_mismatched_calls():
    reports = _run(_mismatch_body)
    _within_timeout(reports, "hidden", range(WORLD))


# ---- a rank that dies --------------------------------------------------------------------------------
def _dies_body(rank, events, backend, survivors, when):
    """Rank 2 exits (os._exit) between calls, or in the middle of a dispatch after its agreement
    (reference only: its first exchange exits). The survivors raise the timeout error naming rank 2
    within the timeout and exit cleanly. Nothing more is possible among them: their next matched
    call would need rank 2 too."""
    call = _Call(events)
    buffer, config = _buffer(backend)
    _good_round(rank, call, SEED, buffer, label="before", config=config)
    mine = _inputs(SEED)[rank]
    layout = buffer.get_dispatch_layout(mine.topk_idx, NUM_EXPERTS)
    if rank not in survivors:
        if when == "between calls":
            os._exit(3)
        buffer._reference._exchange_counts = lambda *args, **kwargs: os._exit(3)
    call("died", lambda: buffer.dispatch(mine.x, topk_idx=mine.topk_idx, num_tokens_per_rank=layout[0],
                                         is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], config=config),
         _timeout_error(), "rank(s) [2]")


@pytest.mark.parametrize("backend,when", [("reference", "between calls"), ("reference", "mid-call"),
                                          pytest.param("emulated", "between calls", marks=needs_emulator)])
def test_rank_that_dies(backend, when):
    reports = _run(_dies_body, env=_emulated_env(), dead=2, backend=backend, when=when)
    _within_timeout(reports, "died", [0, 1])
    if when == "mid-call":
        for r in (0, 1):
            message = [e[3] for e in reports[r]["events"] if e[0] == "died"][0]
            assert "dispatch (counts)" in message, message


# ---- a slow rank -------------------------------------------------------------------------------------
def _slow_body(rank, events, backend):
    call = _Call(events)
    buffer, config = _buffer(backend)
    if rank == 1:
        time.sleep(TIMEOUT_S / 3)
    _good_round(rank, call, SEED, buffer, label="slow", config=config)


@pytest.mark.parametrize("backend", ["reference", pytest.param("emulated", marks=needs_emulator)])
def test_slow_rank_succeeds(backend):
    _run(_slow_body, env=_emulated_env(), backend=backend)


# ---- the plain API after destroy ---------------------------------------------------------------------
def _destroy_body(rank, events):
    call = _Call(events)
    _good_round(rank, call, SEED, None, label="first")
    ep_comm.get_buffer().destroy()
    _good_round(rank, call, SEED + 1, None, label="after-destroy")


def test_plain_api_after_destroy():
    _run(_destroy_body)


# ---- a setup exchange and a teardown a peer never joins ----------------------------------------------
def _setup_and_teardown_body(rank, events):
    """Kernels on the emulated device. Setup: rank 1 fails making its intranode buffer before the IPC
    handle exchange and makes its next call only after the timeout; ranks 0 and 2 raise the timeout
    error within the timeout, naming it; rank 1's next call learns that its peers gave up on the
    exchange, and the call after that is matched.
    Teardown: low-latency NVSHMEM frees are collective; rank 1 destroys only after the timeout:
    ranks 0 and 2 raise the timeout error within it (instead of waiting in the collective free),
    rank 1's late destroy raises too; the collective part is left to the bounded exit hook, which
    all ranks then run together at exit."""
    from ep_comm.backends import intranode

    call = _Call(events)
    if rank == 1:
        def fail(self):
            raise RuntimeError("injected: this rank's intranode buffer could not be made")
        intranode.IntranodeBackend._open_buffer = fail
        call("setup", _emulated_buffer, RuntimeError, "injected")
        time.sleep(TIMEOUT_S + 1.5)  # its next call comes after the peers gave up
    else:
        call("setup", _emulated_buffer, _timeout_error(), "rank(s) [1]")
    num_experts = 2 * WORLD
    size = ep_comm.Buffer.get_low_latency_rdma_size_hint(8, HIDDEN, WORLD, num_experts)
    make = lambda: ep_comm.Buffer(None, 0, size, low_latency_mode=True, backend="emulated")  # noqa: E731
    if rank == 1:
        call("late-setup", make, _timeout_error(), "gave up")
    buffer = call("made", make)
    mine = make_inputs(SEED, rank, 8, HIDDEN, 2, num_experts)
    recv_x, _, handle, _, _ = call("dispatch", lambda: buffer.low_latency_dispatch(mine.x, mine.topk_idx, 8,
                                                                                  num_experts, use_fp8=False))
    call("combine", lambda: buffer.low_latency_combine(recv_x, mine.topk_idx, mine.topk_weights, handle))
    if rank == 1:
        time.sleep(TIMEOUT_S + 1.5)
        call("late-destroy", buffer.destroy, _timeout_error(), "gave up")
    else:
        call("destroy", buffer.destroy, _timeout_error(), "rank(s) [1]")


@needs_emulator
def test_setup_and_teardown_a_peer_never_joins():
    reports = _run(_setup_and_teardown_body, env=_emulated_env())
    _within_timeout(reports, "setup", [0, 2])
    _within_timeout(reports, "destroy", [0, 2])
