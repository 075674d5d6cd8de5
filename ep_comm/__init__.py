"""ep_comm: dispatch and combine for Mixture-of-Experts expert parallelism.

`Buffer` is DeepEP-compatible; `dispatch`/`combine` (and their low-latency twins) are plain
functions with named results. Kernels run wherever the extension is built and a GPU is present;
elsewhere the torch.distributed reference backend implements the same contract.
"""
from ep_comm.version import __version__
from ep_comm.config import Config
from ep_comm.event import EventOverlap
from ep_comm.buffer import Buffer
from ep_comm.errors import EpCommMismatch, EpCommTimeout
from ep_comm.api import (CombineResult, DispatchResult, LowLatencyCombineResult, LowLatencyDispatchResult, combine,
                         dispatch, get_buffer, low_latency_combine, low_latency_dispatch)
import os as _os

from ep_comm import fp8
from ep_comm.arrays import accepts_dlpack

# The public plain functions also take NumPy, CuPy, JAX, ... arrays (DLPack) and return their kind;
# ep_comm.api keeps the torch-only originals.
dispatch = accepts_dlpack(dispatch)
combine = accepts_dlpack(combine)
low_latency_dispatch = accepts_dlpack(low_latency_dispatch)
low_latency_combine = accepts_dlpack(low_latency_combine)

__all__ = [
    "__version__", "Buffer", "Config", "EventOverlap", "fp8", "EpCommTimeout", "EpCommMismatch",
    "dispatch", "combine", "low_latency_dispatch", "low_latency_combine", "get_buffer",
    "DispatchResult", "CombineResult", "LowLatencyDispatchResult", "LowLatencyCombineResult",
]

# Opt-in: with EP_COMM_PROVIDE_DEEP_EP=1, importing ep_comm also makes `import deep_ep` resolve to
# ep_comm.deep_ep (never over a real DeepEP: install() raises then).
if _os.environ.get("EP_COMM_PROVIDE_DEEP_EP") == "1":
    from ep_comm.deep_ep import install_from_env as _install_from_env
    _install_from_env()
