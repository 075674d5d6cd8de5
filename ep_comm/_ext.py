"""Access to the compiled extension ``ep_comm._C``, which may be absent.

The package works without it (the reference backend runs on torch.distributed), so nothing
here raises on import: callers ask :func:`available` / :func:`gpu_available` and fall back.
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

__all__ = ["load", "available", "unavailable_reason", "gpu_available", "layout_function", "require"]

_logger = logging.getLogger("ep_comm")
_lock = threading.Lock()
_attempted = False
_module: Optional[ModuleType] = None
_reason = ""
_warned = False


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


def load() -> Optional[ModuleType]:
    """Import ``ep_comm._C`` once; the module, or None (see :func:`unavailable_reason`)."""
    global _attempted, _module, _reason
    if _attempted:
        return _module
    with _lock:
        if not _attempted:
            _preload_nvshmem()
            try:
                _module = importlib.import_module("ep_comm._C")
            except ImportError as e:
                if isinstance(e, ModuleNotFoundError) and e.name == "ep_comm._C":
                    _reason = ("ep_comm was installed without its CUDA extension (no CUDA toolkit "
                               "at build time, or EP_COMM_NO_CUDA=1); reinstall with nvcc on PATH")
                else:
                    _reason = f"importing ep_comm._C failed: {e}"
            _attempted = True
    return _module


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        _logger.warning("ep_comm GPU kernels are unavailable: %s", _reason)


def available() -> bool:
    """Whether the extension imported (says nothing about a GPU being present)."""
    if load() is None:
        _warn_once()
        return False
    return True


def unavailable_reason() -> str:
    """Why :func:`load` returned None; empty when the extension is available."""
    load()
    return _reason


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
    """``ep_comm._C.<name>`` if the extension is loaded and defines it, else None."""
    mod = load()
    if mod is None:
        _warn_once()
        return None
    return getattr(mod, name, None)


def require() -> ModuleType:
    """The extension, or RuntimeError saying why it is missing."""
    mod = load()
    if mod is None:
        raise RuntimeError(f"ep_comm GPU kernels are unavailable: {_reason}")
    return mod
