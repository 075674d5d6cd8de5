"""Arrays beyond torch: the plain functions take any array that speaks DLPack and return its kind.

`accepts_dlpack(fn)` wraps a plain function (ep_comm/__init__.py applies it to the public ones).
Every argument that has `__dlpack__` and is not a torch.Tensor (NumPy, CuPy, JAX, ...), alone or
inside a tuple (FP8 `x`, `bias`), becomes a torch.Tensor through `torch.from_dlpack`: no copy.
The tensors of the result go back to the kind of `x` through that library's `from_dlpack`: no
copy either; handles, events and plain values stay as they are. Torch callers take a fast path
that calls straight through.

Dtypes. DLPack carries bf16 and float8_e4m3fn, but NumPy has neither: NumPy arrays of
`ml_dtypes.bfloat16` / `ml_dtypes.float8_e4m3fn` cross as uint16 / uint8 views of the same
memory and are viewed back on the other side (still no copy). Any other library gets the same
treatment where its own DLPack export refuses one of these two dtypes.

Streams. `torch.from_dlpack` passes torch's current stream to the producer's `__dlpack__`, which
makes that stream wait for the producer's work; the consumer's `from_dlpack` passes its stream to
`Tensor.__dlpack__`, which makes it wait for torch's current stream. So inputs and outputs are
ordered without a host sync. Two things finish after the call returns and are ordered here:
an `async_finish` event (waited for on torch's current stream before the export, so results are
never handed over early) and a receive hook (after it runs, the consumer's stream is made to wait
for torch's current stream again).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Any, Callable, List, Optional

import torch

from ep_comm.event import EventOverlap

# ml_dtypes' name -> (torch dtype, carrier of the same width as NumPy and torch name it).
_CARRIED = {
    "bfloat16": (torch.bfloat16, "uint16", torch.uint16),
    "float8_e4m3fn": (torch.float8_e4m3fn, "uint8", torch.uint8),
}
_CARRIED_BY_TORCH = {dtype: (name, carrier) for name, (dtype, _, carrier) in _CARRIED.items()}
# What a library raises when its DLPack import or export does not know a dtype.
_DLPACK_ERRORS = (BufferError, RuntimeError, TypeError, ValueError)


class _Unconvertible(Exception):
    pass


_UNCONVERTIBLE = object()  # results' namespace when x's library cannot be found


def is_foreign(value: Any) -> bool:
    """An array of another library: it speaks DLPack and is not a torch.Tensor."""
    return not isinstance(value, torch.Tensor) and hasattr(type(value), "__dlpack__")


def _has_foreign(value: Any) -> bool:
    return is_foreign(value) or (type(value) in (tuple, list) and any(is_foreign(v) for v in value))


def _dtype_name(array: Any) -> Optional[str]:
    return getattr(getattr(array, "dtype", None), "name", None)


def to_torch(array: Any) -> torch.Tensor:
    """A torch.Tensor on the same memory as `array` (any DLPack producer). Raises _Unconvertible."""
    try:
        return torch.from_dlpack(array)
    except _DLPACK_ERRORS as e:
        carried = _CARRIED.get(_dtype_name(array))
        if carried is None:
            raise _Unconvertible(f"{type(array).__name__} of dtype {_dtype_name(array)} does not cross DLPack "
                                 f"({e})") from e
    dtype, numpy_carrier, _ = carried
    try:
        return torch.from_dlpack(array.view(numpy_carrier)).view(dtype)
    except _DLPACK_ERRORS + (AttributeError,) as e:
        raise _Unconvertible(f"{type(array).__name__} of dtype {_dtype_name(array)} does not cross DLPack, "
                             f"nor as {numpy_carrier} ({e})") from e


def namespace_of(array: Any) -> Any:
    """The module whose `from_dlpack` makes arrays of `array`'s kind. Raises _Unconvertible."""
    get_namespace = getattr(array, "__array_namespace__", None)  # the array API standard's way
    if get_namespace is not None:
        namespace = get_namespace()
        if hasattr(namespace, "from_dlpack"):
            return namespace
    root = type(array).__module__.split(".")[0]
    # JAX's array type lives in jaxlib, which has no from_dlpack; jax.numpy has.
    module_name = "jax.numpy" if root in ("jax", "jaxlib") else root
    try:
        namespace = importlib.import_module(module_name)
    except ImportError as e:
        raise _Unconvertible(f"no module {module_name!r} to make {type(array).__name__} results with") from e
    if not hasattr(namespace, "from_dlpack"):
        raise _Unconvertible(f"module {module_name!r} has no from_dlpack to make {type(array).__name__} results with")
    return namespace


def from_torch(tensor: torch.Tensor, namespace: Any) -> Any:
    """An array of `namespace`'s kind on the same memory as `tensor`."""
    tensor = tensor.detach()  # DLPack refuses tensors that require grad; foreign callers have no graph
    carried = _CARRIED_BY_TORCH.get(tensor.dtype)
    if carried is None:
        return namespace.from_dlpack(tensor)
    try:
        return namespace.from_dlpack(tensor)
    except _DLPACK_ERRORS as e:
        direct_error = e
    name, carrier = carried
    try:
        import ml_dtypes
        return namespace.from_dlpack(tensor.view(carrier)).view(getattr(ml_dtypes, name))
    except (ImportError, AttributeError) + _DLPACK_ERRORS as e:
        raise TypeError(f"a {tensor.dtype} result cannot become a {getattr(namespace, '__name__', namespace)} array "
                        f"({direct_error}), nor one of ml_dtypes.{name} ({e}); pass torch tensors to this call, "
                        f"or ask for results in a dtype that library has") from e


def _holds_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (type(value) in (tuple, list)
                                               and any(isinstance(v, torch.Tensor) for v in value))


def _export(value: Any, namespace: Any) -> Any:
    """One result field: a tensor, or a tuple/list holding tensors (FP8 recv_x), in `namespace`'s kind."""
    if isinstance(value, torch.Tensor):
        return from_torch(value, namespace)
    if type(value) in (tuple, list):
        return type(value)(from_torch(v, namespace) if isinstance(v, torch.Tensor) else v for v in value)
    return value


def _ordered_hook(hook: Callable, anchor: torch.Tensor, namespace: Any) -> Callable:
    """`hook` followed by a throwaway export of `anchor`: its `__dlpack__(stream=...)` makes the
    consumer's current stream wait for torch's current stream, where the hook received the data."""
    @functools.wraps(hook)
    def ordered(*args, **kwargs):
        out = hook(*args, **kwargs)
        from_torch(anchor, namespace)
        return out
    return ordered


def convert_result(result: Any, namespace: Any) -> Any:
    """Every tensor field of a result (a dataclass, a tensor or a tuple) in `namespace`'s kind.
    Fields are found generically, so new or renamed fields need nothing here; values that are
    not tensors (handles, events, counts) pass unchanged."""
    if not dataclasses.is_dataclass(result) or isinstance(result, type):
        return _export(result, namespace)
    values = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.init}
    for value in values.values():
        if isinstance(value, EventOverlap):
            value.current_stream_wait()  # async_finish: the outputs are ready only after this
    changes = {name: _export(value, namespace) for name, value in values.items() if _holds_tensor(value)}
    anchor = next((v for v in values.values() if isinstance(v, torch.Tensor)), None)
    if anchor is not None:
        for name, value in values.items():
            if callable(value) and not isinstance(value, type) and not dataclasses.is_dataclass(value):
                changes[name] = _ordered_hook(value, anchor, namespace)
    return dataclasses.replace(result, **changes)


def accepts_dlpack(fn: Callable) -> Callable:
    """`fn` taking DLPack arrays of any library where it takes tensors, and returning `x`'s kind.

    Arguments pass through as given (new keyword arguments included); only foreign arrays, alone
    or in a tuple/list, are replaced by tensors on the same memory. Results are torch when `x` is.
    An argument that cannot cross is passed on unchanged, so the call is refused on every rank by
    the usual checks (and the agreement step) rather than on this rank alone; this rank's message
    then says why it could not cross."""
    parameter_names = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (any(_has_foreign(a) for a in args) or any(_has_foreign(v) for v in kwargs.values())):
            return fn(*args, **kwargs)
        failures: List[str] = []

        def convert(name: str, value: Any) -> Any:
            if is_foreign(value):
                try:
                    return to_torch(value)
                except _Unconvertible as e:
                    failures.append(f"{name}: {e}")
                    return value
            if type(value) in (tuple, list) and any(is_foreign(v) for v in value):
                items = [convert(f"{name}[{i}]", v) for i, v in enumerate(value)]
                return type(value)(items)
            return value

        namespace = _result_namespace(args[0] if args else kwargs.get("x"), failures)
        names = parameter_names + [f"argument {i}" for i in range(len(parameter_names), len(args))]
        args = tuple(a if i == 0 and namespace is _UNCONVERTIBLE else convert(names[i], a)
                     for i, a in enumerate(args))
        kwargs = {k: v if k == "x" and namespace is _UNCONVERTIBLE else convert(k, v) for k, v in kwargs.items()}
        try:
            result = fn(*args, **kwargs)
        except TypeError as e:
            if failures:
                raise TypeError(f"{e} ({'; '.join(failures)})") from e
            raise
        return result if namespace in (None, _UNCONVERTIBLE) else convert_result(result, namespace)

    return wrapper


def _result_namespace(x: Any, failures: List[str]) -> Any:
    """The namespace results are made in: `x`'s (the payload of an FP8 pair), None for torch, or
    _UNCONVERTIBLE when its library cannot be found (x is then passed on as it came)."""
    lead = x[0] if type(x) in (tuple, list) and len(x) > 0 else x
    if not is_foreign(lead):
        return None
    try:
        return namespace_of(lead)
    except _Unconvertible as e:
        failures.append(f"x: {e}")
        return _UNCONVERTIBLE
