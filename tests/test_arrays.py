"""Arrays beyond torch (ep_comm/arrays.py): the plain functions take DLPack arrays without a copy and
return the kind they were given, bit-exact with the torch path; torch callers see no change."""
from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch

import ep_comm
from ep_comm import arrays
from ep_comm.event import EventOverlap
from ep_comm.testing import fp8_tuple, make_inputs
from dist import run_ranks

SEED = 31
TOKENS, HIDDEN, TOPK = 6, 256, 2


def _ml_dtypes():
    return pytest.importorskip("ml_dtypes", reason="NumPy has no bf16/FP8: ml_dtypes provides them")


class ForeignArray:
    """A stand-in for another library's array (CuPy, JAX, ...): it speaks only DLPack and the array
    API's __array_namespace__, so the generic path is exercised without such a library."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    @property
    def dtype(self):
        return self.array.dtype

    def view(self, dtype) -> "ForeignArray":
        return ForeignArray(self.array.view(dtype))

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    def __array_namespace__(self):
        return FOREIGN


FOREIGN = types.SimpleNamespace(__name__="foreign", from_dlpack=lambda t: ForeignArray(np.from_dlpack(t)))


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as the NumPy array a NumPy caller would hold (ml_dtypes for bf16/FP8)."""
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        ml_dtypes = _ml_dtypes()
        carrier, dtype = ((torch.uint16, ml_dtypes.bfloat16) if t.dtype == torch.bfloat16
                          else (torch.uint8, ml_dtypes.float8_e4m3fn))
        return t.view(carrier).numpy().view(dtype)
    return t.numpy()


def _bits(a) -> np.ndarray:
    """An array's bytes as unsigned integers of its width, so bf16/FP8 compare bit for bit."""
    a = _numpy(a) if isinstance(a, torch.Tensor) else a
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _assert_same_result(got, want, kind, label: str, seed: int) -> None:
    """Field by field (whatever the fields are called): every tensor of `want` is a `kind` array in
    `got` with the same dtype name, shape and bits; other values (handles, events) are left alone."""
    assert type(got) is type(want), label
    for field in dataclasses.fields(want):
        g, w = getattr(got, field.name), getattr(want, field.name)
        pairs = list(zip(g, w)) if type(w) in (tuple, list) and any(isinstance(v, torch.Tensor) for v in w) \
            else [(g, w)]
        for g_item, w_item in pairs:
            if not isinstance(w_item, torch.Tensor):
                if type(w_item) in (int, list, type(None)):
                    assert g_item == w_item, f"{label}.{field.name}: {g_item} != {w_item} (seed {seed})"
                continue
            assert isinstance(g_item, kind), f"{label}.{field.name}: {type(g_item).__name__} (seed {seed})"
            g_array = g_item.array if kind is ForeignArray else g_item
            want_array = _numpy(w_item)
            assert g_array.dtype == want_array.dtype and g_array.shape == want_array.shape, \
                f"{label}.{field.name}: {g_array.dtype}{g_array.shape} != {want_array.dtype}{want_array.shape}"
            assert np.array_equal(_bits(g_array), _bits(want_array)), f"{label}.{field.name} differs (seed {seed})"


def test_numpy_crosses_without_a_copy():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)[:, 1:]   # strided view: no copy either
    t = arrays.to_torch(a)
    assert t.data_ptr() == a.ctypes.data and t.stride() == (4, 1)
    t[0, 0] = -7
    assert a[0, 0] == -7
    back = arrays.from_torch(t, np)
    assert isinstance(back, np.ndarray) and np.shares_memory(back, a)
    idx = np.array([[0, -1]], dtype=np.int64)
    t_idx = arrays.to_torch(idx)
    assert t_idx.dtype == torch.int64 and np.shares_memory(arrays.from_torch(t_idx, np), idx)


def test_bf16_and_fp8_cross_as_ml_dtypes_views():
    ml_dtypes = _ml_dtypes()
    x = np.linspace(-3, 3, 16, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 8)
    t = arrays.to_torch(x)
    assert t.dtype == torch.bfloat16 and t.data_ptr() == x.ctypes.data
    assert torch.equal(t.float(), torch.from_numpy(x.astype(np.float32)))
    back = arrays.from_torch(t, np)
    assert back.dtype == ml_dtypes.bfloat16 and np.shares_memory(back, x)
    f8 = x.astype(ml_dtypes.float8_e4m3fn)
    t8 = arrays.to_torch(f8)
    assert t8.dtype == torch.float8_e4m3fn and t8.data_ptr() == f8.ctypes.data
    assert arrays.from_torch(t8, np).dtype == ml_dtypes.float8_e4m3fn
    # A tensor that requires grad is exported detached (DLPack refuses it otherwise).
    assert isinstance(arrays.from_torch(torch.ones(2, requires_grad=True), np), np.ndarray)


def test_what_does_not_cross_is_refused_by_the_usual_checks():
    with pytest.raises(arrays._Unconvertible, match="does not cross DLPack"):
        arrays.to_torch(np.array([["a"]]))
    # Passed on as it came, so the call's own check refuses it (on every rank, through the agreement
    # step); this rank's message adds why it could not cross.
    wrapped = ep_comm.arrays.accepts_dlpack(lambda x, topk_idx: ep_comm.validation.check_topk_idx(topk_idx, 4))
    with pytest.raises(TypeError, match=r"must be a torch.Tensor.*topk_idx: ndarray of dtype str32 does not"):
        wrapped(torch.zeros(1, 8), np.array([["a"]]))


def test_torch_callers_and_new_arguments_pass_through_unchanged():
    seen = {}

    def fn(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return sentinel

    sentinel = object()
    wrapped = arrays.accepts_dlpack(fn)
    x, handle = torch.zeros(2, 8), object()
    assert wrapped(x, handle=handle, some_future_option=3) is sentinel
    assert seen["args"][0] is x and seen["kwargs"] == {"handle": handle, "some_future_option": 3}
    # A NumPy topk_idx beside a torch x: converted, but results stay torch (they follow x).
    idx = np.zeros((2, 1), dtype=np.int64)
    assert wrapped(x, idx, handle=handle) is sentinel
    assert isinstance(seen["args"][1], torch.Tensor) and seen["args"][1].data_ptr() == idx.ctypes.data
    assert seen["kwargs"] == {"handle": handle}
    # The public functions keep their names, docs and signatures.
    for name in ("dispatch", "combine", "low_latency_dispatch", "low_latency_combine"):
        public, original = getattr(ep_comm, name), getattr(ep_comm.api, name)
        assert public.__wrapped__ is original and public.__doc__ == original.__doc__


class _RecordingEvent(EventOverlap):
    def __init__(self) -> None:
        super().__init__(None)
        self.waited = 0

    def current_stream_wait(self) -> None:
        self.waited += 1


def test_results_convert_field_by_field():
    @dataclasses.dataclass
    class Result:   # any fields: nothing in arrays.py knows the names
        payload: torch.Tensor
        pair: tuple
        counts: list
        handle: object
        event: EventOverlap
        hook: object
        missing: object = None

    calls = []
    payload = torch.arange(4.0)
    result = Result(payload, (torch.ones(2, dtype=torch.int32), None), [3, 1], object(), _RecordingEvent(),
                    lambda: calls.append("hook") or "received")
    converted = arrays.convert_result(result, np)
    assert isinstance(converted.payload, np.ndarray) and np.shares_memory(converted.payload, payload.numpy())
    assert isinstance(converted.pair[0], np.ndarray) and converted.pair[1] is None
    assert converted.counts == [3, 1] and converted.handle is result.handle and converted.missing is None
    assert converted.event is result.event and result.event.waited == 1   # async results waited for first
    assert converted.hook() == "received" and calls == ["hook"]


def _plain_api_body(rank, world, group, seed):
    ml_dtypes = _ml_dtypes()
    num_experts = 2 * world
    mine = make_inputs(seed, rank, TOKENS, HIDDEN, TOPK, num_experts)
    x, idx, weights = _numpy(mine.x), mine.topk_idx.numpy(), mine.topk_weights.numpy()
    assert x.dtype == ml_dtypes.bfloat16

    # Normal mode: bf16 and FP8, through NumPy and through another DLPack library.
    want = ep_comm.dispatch(mine.x, mine.topk_idx, mine.topk_weights, num_experts=num_experts, group=group)
    assert isinstance(want.recv_x, torch.Tensor)  # torch callers get torch
    got = ep_comm.dispatch(x, idx, weights, num_experts=num_experts, group=group)
    _assert_same_result(got, want, np.ndarray, "dispatch", seed)
    foreign = ep_comm.dispatch(ForeignArray(x), ForeignArray(idx), ForeignArray(weights), num_experts=num_experts,
                               group=group)
    _assert_same_result(foreign, want, ForeignArray, "dispatch(foreign)", seed)
    # Mixed: torch x, NumPy routing: results follow x.
    mixed = ep_comm.dispatch(mine.x, idx, weights, num_experts=num_experts, group=group)
    assert isinstance(mixed.recv_x, torch.Tensor) and torch.equal(mixed.recv_x, want.recv_x)

    want_combined = ep_comm.combine(want.recv_x, want.handle, want.recv_topk_weights)
    got_combined = ep_comm.combine(got.recv_x, got.handle, got.recv_topk_weights)
    _assert_same_result(got_combined, want_combined, np.ndarray, "combine", seed)

    payload, scales = fp8_tuple(mine.x)
    want_fp8 = ep_comm.dispatch((payload, scales), mine.topk_idx, num_experts=num_experts, group=group)
    got_fp8 = ep_comm.dispatch((_numpy(payload), scales.numpy()), idx, num_experts=num_experts, group=group)
    _assert_same_result(got_fp8, want_fp8, np.ndarray, "dispatch(fp8)", seed)

    # Low-latency: FP8 and bf16 dispatch, combine into a NumPy `out`, stats updated in place.
    stats_want = torch.zeros(num_experts // world, dtype=torch.int32)
    stats = np.zeros(num_experts // world, dtype=np.int32)
    for use_fp8 in (True, False):
        ll_want = ep_comm.low_latency_dispatch(mine.x, mine.topk_idx, TOKENS, num_experts, group=group,
                                               cumulative_local_expert_recv_stats=stats_want, use_fp8=use_fp8)
        # The next call may reuse the receive buffer: keep the torch results.
        ll_want = dataclasses.replace(ll_want, **{f.name: getattr(ll_want, f.name).clone()
                                                  for f in dataclasses.fields(ll_want)
                                                  if isinstance(getattr(ll_want, f.name), torch.Tensor)})
        ll_got = ep_comm.low_latency_dispatch(x, idx, TOKENS, num_experts, group=group,
                                              cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8)
        _assert_same_result(ll_got, ll_want, np.ndarray, f"low_latency_dispatch(use_fp8={use_fp8})", seed)
    assert np.array_equal(stats, stats_want.numpy())

    want_out = ep_comm.low_latency_combine(ll_want.recv_x, mine.topk_idx, mine.topk_weights, ll_want.handle)
    want_out = want_out.combined_x.clone()
    out = np.empty((TOKENS, HIDDEN), dtype=ml_dtypes.bfloat16)
    ll_combined = ep_comm.low_latency_combine(ll_got.recv_x, idx, weights, ll_got.handle, out=out)
    assert isinstance(ll_combined.combined_x, np.ndarray) and np.shares_memory(ll_combined.combined_x, out)
    assert np.array_equal(_bits(out), _bits(want_out)), f"low_latency_combine out differs (seed {seed})"


def test_numpy_through_the_plain_api():
    _ml_dtypes()
    run_ranks(_plain_api_body, 3, seed=SEED)


def _cupy_body(rank, world, group, seed):
    import cupy
    torch.cuda.set_device(rank % torch.cuda.device_count())
    cupy.cuda.Device(torch.cuda.current_device()).use()
    num_experts = 2 * world
    mine = make_inputs(seed, rank, TOKENS, HIDDEN, TOPK, num_experts)
    x, idx, weights = (t.cuda() for t in (mine.x, mine.topk_idx, mine.topk_weights))
    want = ep_comm.dispatch(x, idx, weights, num_experts=num_experts, group=group)
    want_combined = ep_comm.combine(want.recv_x, want.handle).combined_x
    # CuPy has bf16 only as ml_dtypes.bfloat16 (recent CuPy); without it x stays torch and only the
    # routing is CuPy, so results are torch.
    try:
        arrays.from_torch(x, cupy)
        x_is_cupy = True
    except TypeError:
        x_is_cupy = False
    # The inputs are written on a CuPy stream that torch knows nothing of: the DLPack stream
    # handshake alone must order them before the call, and the results before CuPy's next work.
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        x_in = arrays.from_torch(x, cupy).copy() if x_is_cupy else x
        idx_in, weights_in = cupy.from_dlpack(idx).copy(), cupy.from_dlpack(weights).copy()
        assert arrays.to_torch(idx_in).data_ptr() == idx_in.data.ptr   # zero-copy in
        got = ep_comm.dispatch(x_in, idx_in, weights_in, num_experts=num_experts, group=group)
        combined = ep_comm.combine(got.recv_x, got.handle).combined_x if x_is_cupy else None
        recv_copies = {f.name: getattr(got, f.name).copy() for f in dataclasses.fields(got)
                       if isinstance(getattr(got, f.name), cupy.ndarray)}
    stream.synchronize()
    kind = cupy.ndarray if x_is_cupy else torch.Tensor
    for field in dataclasses.fields(want):
        w, g = getattr(want, field.name), getattr(got, field.name)
        if isinstance(w, torch.Tensor):
            assert isinstance(g, kind), field.name
            g = arrays.to_torch(recv_copies[field.name]) if x_is_cupy else g
            assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), f"{field.name} differs (seed {seed})"
    if x_is_cupy:
        assert isinstance(combined, cupy.ndarray)
        assert torch.equal(arrays.to_torch(combined).view(torch.int16), want_combined.view(torch.int16)), \
            f"combined_x differs (seed {seed})"
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cupy_through_the_plain_api():
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available() or cupy.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("needs a CUDA GPU")
    world = min(2, torch.cuda.device_count())
    run_ranks(_cupy_body, world, seed=SEED)
