"""Where a kernel backend runs: a CUDA GPU through ``ep_comm._C``, or the emulated device through
``ep_comm._C_emu`` (the same kernel sources compiled for the host, run on CPU threads with CPU
tensors; docs/design.md, "The emulated device").

A kernel backend is written once against a KernelTarget: the module it calls, the device its
tensors live on, the index and stream it passes to the module, how many SMs may be resident at
once, and what must happen when an op ends. On a GPU an op ends asynchronously (outputs are
ordered by the stream, as in CUDA); on the emulator it ends with ``_C_emu.synchronize()``, because
CPU tensors have no stream that would order the caller's later reads (or the freeing of
temporaries) after the kernels.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Tuple

import torch

from ep_comm import _ext

# Kernel families each target can run, as make_backend names them.
_CUDA_FAMILIES = ("intranode", "internode", "low_latency")
_EMULATED_FAMILIES = ("intranode", "internode", "low_latency")
_FAMILY_WORDS = {"intranode": "intranode", "internode": "internode", "low_latency": "low-latency"}


@dataclass(frozen=True)
class KernelTarget:
    kind: str                           # Buffer's backend name: 'kernels' or 'emulated'
    module: ModuleType                  # ep_comm._C or ep_comm._C_emu
    device: torch.device                # where every tensor of a call lives: cuda:i, or cpu
    device_index: int                   # the device index the module is given (0 on the emulator)
    description: str                    # for messages: 'cuda:0', 'the emulated device'
    num_sms: int                        # SMs: blocks that can be resident at once
    families: Tuple[str, ...]           # kernel families this target runs
    stream: Callable[[], int]           # the stream to launch on (the current CUDA stream; 0 on the emulator)
    is_capturing: Callable[[], bool]    # whether a CUDA graph is being captured on the current stream
    after_op: Callable[[], None]        # runs when an op ends, raised or not: nothing on a GPU, a sync on the emulator

    @property
    def emulated(self) -> bool:
        return self.kind == "emulated"

    @contextlib.contextmanager
    def op(self) -> Iterator[None]:
        """Wraps the body of an op: at its end, raised or not, after_op runs (on the emulator, a
        synchronize) while the op's locals (contiguous copies, outputs) are still alive."""
        try:
            yield
        finally:
            self.after_op()

    def on_device(self):
        """The CUDA device made current for a call into the runtime; nothing on the emulator."""
        return contextlib.nullcontext() if self.emulated else torch.cuda.device(self.device)

    def require_family(self, family: str) -> None:
        """NotImplementedError (a RuntimeError) if this target cannot run `family` yet."""
        if family not in self.families:
            words = _FAMILY_WORDS.get(family, family)
            runs = ", ".join(_FAMILY_WORDS.get(f, f) for f in self.families)
            raise NotImplementedError(
                f"the emulator does not run the {words} kernels yet (it runs: {runs}); use backend='reference' "
                f"for {words} buffers on a CPU, or backend='kernels' on a GPU")


def resolve_target(device: torch.device, target: "KernelTarget | None", words: str) -> KernelTarget:
    """The target a kernel backend of a Buffer on `device` runs on: `target` when given (the emulated
    device), else the CUDA kernels on `device`. ValueError when they do not match; `words` names
    the kernels in messages ('the intranode kernels')."""
    if target is None:
        if device.type != "cuda":
            raise ValueError(f"{words} need a CUDA device, got {device}")
        return cuda_target(device)
    if device.type != target.device.type:
        raise ValueError(f"this Buffer's device is {device}, but {words} run on {target.device}")
    return target


def cuda_target(device: torch.device) -> KernelTarget:
    """The CUDA kernels on `device` (a cuda device; its index defaults to the current one)."""
    if device.type != "cuda":
        raise ValueError(f"the CUDA kernels need a CUDA device, got {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return KernelTarget(
        kind="kernels", module=_ext.require(), device=device, device_index=device.index, description=str(device),
        num_sms=torch.cuda.get_device_properties(device).multi_processor_count, families=_CUDA_FAMILIES,
        stream=lambda: torch.cuda.current_stream(device).cuda_stream,
        is_capturing=torch.cuda.is_current_stream_capturing, after_op=lambda: None)


def emulated_target() -> KernelTarget:
    """The kernels on the emulated device: CPU tensors, device 0 and stream 0 in every rank process."""
    module = _ext.require_emulated()
    return KernelTarget(
        kind="emulated", module=module, device=torch.device("cpu"), device_index=0,
        description="the emulated device", num_sms=int(module.get_device_properties(0)["num_sms"]),
        families=_EMULATED_FAMILIES, stream=lambda: 0, is_capturing=lambda: False, after_op=module.synchronize)


def kernel_target(kind: str, device: torch.device) -> KernelTarget:
    """The target of Buffer backend `kind` ('kernels' or 'emulated')."""
    if kind == "kernels":
        return cuda_target(device)
    if kind == "emulated":
        return emulated_target()
    raise ValueError(f"no kernel target for backend {kind!r}; expected 'kernels' or 'emulated'")
