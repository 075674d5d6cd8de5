"""Access to the compiled extensions, which may be absent.

``ep_comm._C`` holds the CUDA kernels; ``ep_comm._C_emu`` holds the same kernel sources compiled
for the host, run on CPU threads by the emulated device (docs/design.md). The package works
without either (the reference backend runs on torch.distributed), so nothing here raises on
import: callers ask :func:`available` / :func:`gpu_available` (or :func:`emulated_available`)
and fall back.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import logging
import os
import threading
from types import ModuleType
from typing import Callable, Optional

__all__ = ["load", "available", "unavailable_reason", "gpu_available", "compiled_cuda_archs", "layout_function",
           "require", "load_emulated", "emulated_available", "emulated_unavailable_reason", "require_emulated"]

_logger = logging.getLogger("ep_comm")
_warned = False


class _Loader:
    """Imports one extension module once (thread-safe) and remembers why it could not."""

    def __init__(self, name: str, not_built: str, before_import: Optional[Callable[[], None]] = None) -> None:
        self.name = name
        self._not_built = not_built          # the reason when the module was never built
        self._before_import = before_import
        self._lock = threading.Lock()
        self._attempted = False
        self.module: Optional[ModuleType] = None
        self.reason = ""

    def load(self) -> Optional[ModuleType]:
        if self._attempted:
            return self.module
        with self._lock:
            if not self._attempted:
                if self._before_import is not None:
                    self._before_import()
                try:
                    self.module = importlib.import_module(self.name)
                except ImportError as e:
                    if isinstance(e, ModuleNotFoundError) and e.name == self.name:
                        self.reason = self._not_built
                    else:
                        self.reason = f"importing {self.name} failed: {e}"
                self._attempted = True
        return self.module


def _nvshmem_lib_dirs() -> list[str]:
    dirs = []
    if os.environ.get("NVSHMEM_HOME"):
        dirs.append(os.path.join(os.environ["NVSHMEM_HOME"], "lib"))
    try:
        spec = importlib.util.find_spec("nvidia.nvshmem")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs += [os.path.join(p, "lib") for p in spec.submodule_search_locations]
    return dirs


def _preload_nvshmem() -> None:
    # _C needs libnvshmem_host.so.3. Its rpath finds the wheel in a regular install; loading it
    # here by path also covers editable installs, moved environments and NVSHMEM_HOME, and
    # RTLD_GLOBAL lets NVSHMEM's own plugins (bootstrap, transports) resolve its symbols.
    for d in _nvshmem_lib_dirs():
        path = os.path.join(d, "libnvshmem_host.so.3")
        if os.path.isfile(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


_kernels = _Loader("ep_comm._C", "ep_comm was installed without its CUDA extension (no CUDA toolkit "
                   "at build time, or EP_COMM_NO_CUDA=1); reinstall with nvcc on PATH", _preload_nvshmem)
_emulated = _Loader("ep_comm._C_emu", "ep_comm was installed without its emulated device (ep_comm._C_emu, the "
                    "kernels compiled for the host); reinstall with `pip install -e . --no-build-isolation`")


def load() -> Optional[ModuleType]:
    """Import ``ep_comm._C`` once; the module, or None (see :func:`unavailable_reason`)."""
    return _kernels.load()


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        _logger.warning("ep_comm GPU kernels are unavailable: %s", _kernels.reason)


def available() -> bool:
    """Whether the extension imported (says nothing about a GPU being present)."""
    if load() is None:
        _warn_once()
        return False
    return True


def unavailable_reason() -> str:
    """Why :func:`load` returned None; empty when the extension is available."""
    load()
    return _kernels.reason


def gpu_available() -> bool:
    """The extension is loaded and sees at least one CUDA device."""
    mod = load()
    if mod is None:
        _warn_once()
        return False
    try:
        return mod.device_count() > 0
    except RuntimeError as e:  # a broken driver rather than no driver: say so, run without
        _logger.warning("ep_comm: CUDA device query failed: %s", e)
        return False


def layout_function(name: str) -> Optional[Callable]:
    """``ep_comm._C.<name>`` if the extension is loaded and defines it, else None. Without ``_C``,
    the emulated build's function of that name: sizes come from the same sources in both."""
    mod = load()
    if mod is None:
        _warn_once()
        mod = load_emulated()
        if mod is None:
            return None
    return getattr(mod, name, None)


def compiled_cuda_archs() -> list[str]:
    """The architectures ``ep_comm._C`` was built for (``EP_COMM_CUDA_ARCHS`` at build time, e.g.
    ``["90", "100a"]``; a ``+PTX`` suffix kept); empty without the extension."""
    mod = load()
    if mod is None:
        _warn_once()
        return []
    archs = str(mod.build_info().get("cuda_archs", ""))
    return [a for a in archs.split(";") if a and a != "unknown"]


def require() -> ModuleType:
    """The extension, or RuntimeError saying why it is missing."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"ep_comm GPU kernels are unavailable: {_kernels.reason}")
    return mod


# ---- the emulated device (opt-in: Buffer(backend="emulated") or EP_COMM_BACKEND=emulated) -----------

def load_emulated() -> Optional[ModuleType]:
    """Import ``ep_comm._C_emu`` once; the module, or None (see :func:`emulated_unavailable_reason`)."""
    return _emulated.load()


def emulated_available() -> bool:
    """Whether the emulated device's extension imported (it needs no GPU)."""
    return load_emulated() is not None


def emulated_unavailable_reason() -> str:
    """Why :func:`load_emulated` returned None; empty when it is available."""
    load_emulated()
    return _emulated.reason


def require_emulated() -> ModuleType:
    """``ep_comm._C_emu``, or RuntimeError saying why it is missing."""
    mod = load_emulated()
    if mod is None:
        raise RuntimeError(f"the ep_comm emulated device is unavailable: {_emulated.reason}")
    return mod
