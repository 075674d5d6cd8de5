"""The exceptions ep_comm raises when ranks disagree or stop answering (inputs a rank rejects on its
own raise TypeError/ValueError as before).

- `EpCommTimeout`: a wait gave up after EP_COMM_TIMEOUT_S (or saw a peer's connection drop first).
  The message names this rank, the phase and the ranks still missing; a late rank whose peers
  already gave up on its call gets it too.
- `EpCommMismatch`: ranks made calls that do not match (another method, other shapes or dtypes, or a
  peer rejected its inputs). Raised on every rank; nothing was sent.

After either one raised before anything was sent (the agreement step), the Buffer serves the next
call every rank makes alike; after a timeout inside a transfer, destroy the Buffer on every live
rank. See README "Reliability".
"""
from __future__ import annotations


class EpCommTimeout(RuntimeError, TimeoutError):
    """A host or device wait of ep_comm gave up after EP_COMM_TIMEOUT_S seconds, or lost its peer."""


class EpCommMismatch(RuntimeError, ValueError):
    """The ranks of a group made calls that do not match; raised on every rank, nothing was sent.

    A ValueError too: like a bad argument, it is the caller's to fix (make the same calls)."""


def is_timeout_message(message: str) -> bool:
    """Whether a RuntimeError from the kernels' runtime reports a timeout (device or host wait)."""
    return "timed out" in message
