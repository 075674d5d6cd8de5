"""Agreed calls: before a collective call runs, every rank learns that every rank makes the same call.

Each collective call of a Buffer (and each plain-API call) posts one short message: the call's
number in its group's sequence (one per group: all its Buffers and the plain API), its kind, the
fields that must match across ranks (the Buffer, hidden, dtypes, top-k, number of experts, options,
the dispatch a handle came from) and whether this rank's inputs passed validation. Only when all
messages match does anyone communicate; otherwise every rank raises, naming the ranks and what
differs. Nothing is sent, so the Buffer serves the next call. Kernel backends' setup exchanges and
barriers use the same step (all_gather_object, barrier below), so they are bounded too.

The messages go through the process group's key-value store (the one torch.distributed was
initialised with), not through a collective: a store wait can time out and be retried without
leaving a half-finished collective behind (a gloo collective that timed out still pairs with the
late rank's next collective). Keys are numbered by call, so a late rank finds its own call, and a
compare-and-set on the call's commit key settles the race between "everyone arrived" and "a rank
gave up": the first writer wins, and a late rank learns that its call was abandoned.
Cost: five store round trips per call (BENCHMARKS.md, CPU section); no device work. The keys of
a call are deleted at the next call; the group's last call and abandoned calls leave theirs (a few
hundred bytes in the store per group, and per timeout).
"""
from __future__ import annotations

import base64
import datetime
import json
import os
import pickle
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from ep_comm.errors import EpCommMismatch, EpCommTimeout

# The two fates of a call, written once to its commit key (compare-and-set: the first writer wins).
_COMMITTED = "committed"
_ABANDONED = "abandoned"
_ERROR_CHARS = 400
_agreements: Dict[Tuple[str, int], "Agreement"] = {}
_agreements_lock = threading.Lock()


def timeout_s() -> float:
    """EP_COMM_TIMEOUT_S (default 100 s): how long any ep_comm wait lasts before it gives up."""
    value = float(os.environ.get("EP_COMM_TIMEOUT_S", "100"))
    if not value > 0:
        raise ValueError(f"EP_COMM_TIMEOUT_S must be a positive number of seconds, got {value}")
    return value


def _group_name(group) -> str:
    name = getattr(group, "group_name", None)
    return str(name) if name else str(dist.get_process_group_ranks(group))


def for_group(group) -> "Agreement":
    """The call sequence of `group` in this process, shared by all its Buffers and the plain API.
    One sequence per group, not per Buffer: collectives on one group must come in one order on every
    rank anyway, and a shared sequence leaves no keys behind in the store when a Buffer goes."""
    store = dist.distributed_c10d._get_default_store()
    key = (_group_name(group), id(store))
    with _agreements_lock:
        found = _agreements.get(key)
        if found is None:
            found = _agreements[key] = Agreement(group, f"ep_comm/{key[0]}", store)
        return found


def ranks_text(ranks: Sequence[int]) -> str:
    ranks = list(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ",".join(str(r) for r in ranks)


class Agreement:
    """The call sequence of one process group (see for_group) and its agreement step."""

    def __init__(self, group, prefix: str, store) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.prefix = prefix
        self.seq = 0            # number of the next call
        self.store = store
        self.timeout_s = 0.0    # of the call in progress

    def _key(self, seq: int, name: str) -> str:
        return f"{self.prefix}/{seq}/{name}"

    def agree(self, kind: str, fields: Sequence[Tuple[str, Any]], error: Optional[BaseException], timeout: float,
              info: Any = None) -> List[Any]:
        """Post this rank's call and wait at most `timeout` seconds for every rank's. Returns every
        rank's `info` (rank order).

        Raises `error` (this rank's own validation error) if it is set and the call is refused;
        EpCommMismatch if another rank rejected its inputs or made another call; EpCommTimeout if a
        rank did not arrive within the timeout, or if this rank arrived after its peers gave up."""
        seq = self.seq
        self.seq += 1
        self.timeout_s = timeout
        message = {"kind": kind, "fields": [[name, _plain(value)] for name, value in fields],
                   "error": None if error is None else f"{type(error).__name__}: {error}"[:_ERROR_CHARS],
                   "info": info}
        keys = [self._key(seq, f"m{r}") for r in range(self.num_ranks)]
        store = self.store
        try:
            store.set(keys[self.rank], json.dumps(message))
            self._wait_and_commit(seq, kind, keys)
            messages = [json.loads(m) for m in store.multi_get(keys)]
            # Every rank reached this call, so all have read the previous one's messages.
            store.delete_key(self._key(seq - 1, f"m{self.rank}"))
            if self.rank == 0:
                store.delete_key(self._key(seq - 1, "commit"))
        except (EpCommTimeout, EpCommMismatch):
            raise
        except Exception as e:  # noqa: BLE001 - the store itself failed (its host, rank 0, may be gone)
            raise EpCommTimeout(f"ep_comm rank {self.rank}: the agreement step of {kind} (call #{seq}) could not "
                                f"reach the process group's store ({type(e).__name__}: {e}); the process that "
                                "hosts it (rank 0 of the default group) may have exited") from None
        self._check(seq, kind, messages, error)
        return [m["info"] for m in messages]

    def _wait_and_commit(self, seq: int, kind: str, keys: List[str]) -> None:
        """Wait for every rank's message, then settle the call's fate with one compare-and-set on its
        commit key: the first rank to write decides, "committed" (all messages were there: the call
        runs on every rank) or "abandoned" (a rank gave up waiting: it runs on none)."""
        store = self.store
        commit = self._key(seq, "commit")
        try:
            store.wait(keys, datetime.timedelta(seconds=self.timeout_s))
        except Exception:  # noqa: BLE001 - a timeout; a dead store fails again below and is reported there
            store.set(self._key(seq, f"gaveup{self.rank}"), "1")
            if _text(store.compare_set(commit, "", _ABANDONED)) == _COMMITTED:
                # A rank saw every message before this one gave up: the call goes ahead everywhere.
                store.wait(keys, datetime.timedelta(seconds=self.timeout_s))
                return
            missing = [r for r in range(self.num_ranks) if not store.check([keys[r]])]
            raise EpCommTimeout(
                f"ep_comm rank {self.rank} gave up after {self.timeout_s:g} s (EP_COMM_TIMEOUT_S) in the agreement "
                f"step of {kind} (call #{seq} on this group): still waiting for rank(s) {missing}, which did not "
                "make this call. Nothing was sent. If they are alive, their late call raises too, and the next "
                "call every rank makes alike runs; if one died, the group cannot be used without it") from None
        if _text(store.compare_set(commit, "", _COMMITTED)) == _ABANDONED:
            gave_up = [r for r in range(self.num_ranks) if store.check([self._key(seq, f"gaveup{r}")])]
            self._skip_abandoned(seq)
            raise EpCommTimeout(
                f"ep_comm rank {self.rank}: {kind} (call #{seq} on this group) arrived after rank(s) {gave_up} "
                f"gave up waiting for it (EP_COMM_TIMEOUT_S={self.timeout_s:g} s), so no rank ran it. This rank "
                f"now continues at call #{self.seq}, the call its peers are making or will make next: make the "
                "next call on every rank alike (or destroy the Buffer on every rank and create a new one)")

    def _skip_abandoned(self, seq: int) -> None:
        """After a late arrival, move past the calls the peers gave up on meanwhile (none of them ran),
        so this rank's next call meets the peers' next call."""
        nxt = seq + 1
        while True:
            commit = self._key(nxt, "commit")
            if not (self.store.check([commit]) and _text(self.store.get(commit)) == _ABANDONED):
                break
            nxt += 1
        self.seq = max(self.seq, nxt)

    def stuck_peers(self, what: str) -> List[int]:
        """Ranks that did not report, within a second, that they wait in the same step of the same call."""
        seq = self.seq - 1
        name = f"stuck/{what}/"
        try:
            self.store.set(self._key(seq, name + str(self.rank)), "1")
            deadline = time.monotonic() + 1.0
            while True:
                silent = [r for r in range(self.num_ranks)
                          if r != self.rank and not self.store.check([self._key(seq, name + str(r))])]
                if not silent or time.monotonic() > deadline:
                    return silent
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the store is gone too: every peer is suspect
            return [r for r in range(self.num_ranks) if r != self.rank]

    def _check(self, seq: int, kind: str, messages: List[dict], error: Optional[BaseException]) -> None:
        kinds = [m["kind"] for m in messages]
        rejected = [r for r, m in enumerate(messages) if m["error"] is not None]
        problem = None
        if len(set(kinds)) > 1:
            problem = "; ".join(_differences(messages, lambda m: m["kind"], lambda v: "", verb_only=True))
        elif rejected:
            details = "; ".join(f"rank {r}: {messages[r]['error']}" for r in rejected)
            problem = f"rank(s) {rejected} rejected their inputs ({details})"
        else:
            names = list(dict.fromkeys(name for m in messages for name, _ in m["fields"]))
            diffs: List[str] = []
            for name in names:
                diffs += _differences(messages, lambda m, name=name: dict(m["fields"]).get(name, "(absent)"),
                                      lambda v, name=name: f" with {name}={v}", kind=kind)
            if diffs:
                problem = "; ".join(diffs)
        if problem is None:
            return
        if error is not None:
            raise error
        raise EpCommMismatch(f"ep_comm rank {self.rank}: {kind} (call #{seq} on this group) was not run on any rank: "
                             f"{problem}. Every rank must make the same calls in the same order, with the same "
                             "shapes, dtypes and options; this Buffer serves the next matched call")


def _differences(messages: List[dict], get, describe, verb_only: bool = False, kind: str = "") -> List[str]:
    """'rank 1 called dispatch with hidden=256, ranks 0,2 with hidden=128' (smallest group first)."""
    groups: Dict[str, List[int]] = {}
    for r, m in enumerate(messages):
        groups.setdefault(json.dumps(get(m)), []).append(r)
    if len(groups) <= 1:
        return []
    ordered = sorted(groups.items(), key=lambda item: (len(item[1]), item[1]))
    parts = []
    for i, (value, ranks) in enumerate(ordered):
        value = json.loads(value)
        if verb_only:
            parts.append(f"{ranks_text(ranks)} called {value}")
        elif i == 0:
            parts.append(f"{ranks_text(ranks)} called {kind}{describe(value)}")
        else:
            parts.append(f"{ranks_text(ranks)}{describe(value)}")
    return [", ".join(parts)]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _plain(value: Any) -> Any:
    """A JSON-friendly form of a field: ints, floats, bools and strings stay; others become text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def all_gather_object(obj: Any, ctx, what: str) -> List[Any]:
    """Every rank's `obj` (rank order), like dist.all_gather_object, but bounded by ctx.timeout_s and
    agreed like a call (a rank elsewhere is named, not waited for): the setup exchanges of kernel
    backends (IPC handles, NVSHMEM ids, outcomes) and their barriers. `ctx` is a BackendContext; one
    made without a Buffer's agreement falls back to the group collective."""
    agreement = getattr(ctx, "agreement", None)
    if agreement is None:
        everyone: List[Any] = [None] * dist.get_world_size(ctx.group)
        dist.all_gather_object(everyone, obj, group=ctx.group)
        return everyone
    infos = agreement.agree(what, [], None, ctx.timeout_s, base64.b64encode(pickle.dumps(obj)).decode())
    return [pickle.loads(base64.b64decode(info)) for info in infos]


def barrier(ctx, what: str) -> None:
    """A barrier over ctx.group, bounded and agreed like all_gather_object."""
    if getattr(ctx, "agreement", None) is None:
        dist.barrier(group=ctx.group)
    else:
        ctx.agreement.agree(what, [], None, ctx.timeout_s)


def hostname() -> str:
    return socket.gethostname()


def wait_for(work, timeout: float, what: str, agreement: Optional["Agreement"] = None) -> None:
    """Wait for an async collective (`work`) at most `timeout` seconds. A timeout, or a peer's
    connection lost meanwhile (gloo notices a dead peer at once), raises EpCommTimeout naming this
    rank, the phase (`what`) and, through the store, the ranks that did not report waiting too."""
    start = time.monotonic()
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout))
        return
    except Exception as e:  # noqa: BLE001 - gloo reports both as a RuntimeError
        waited = time.monotonic() - start
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    rank = agreement.rank if agreement is not None else dist.get_rank()
    missing = agreement.stuck_peers(what) if agreement is not None else "unknown"
    how = (f"gave up after {timeout:g} s (EP_COMM_TIMEOUT_S)" if waited >= timeout * 0.9 else
           f"lost a peer after {waited:.1f} s")
    raise EpCommTimeout(f"ep_comm rank {rank} {how} in {what}: still waiting for rank(s) {missing} (they did not "
                        f"report waiting in this step: a rank that died, or hangs elsewhere). The collective was "
                        f"abandoned ({cause[:300]}); the Buffer's state is undefined: destroy it on every live rank"
                        ) from None
