"""The interconnect microbenchmark bindings (csrc/bindings/microbench.cpp) and their use in
`python -m ep_comm.bench interconnect` (ep_comm/bench/interconnect.py): present in the extension,
readable errors without a GPU, and (on a GPU) sm_copy reproducing its source byte for byte."""
import pytest
import torch

from ep_comm import _ext

C = _ext.load()
needs_extension = pytest.mark.skipif(C is None, reason=f"ep_comm._C is not built: {_ext.unavailable_reason()}")
GPU = C is not None and _ext.gpu_available() and torch.cuda.is_available()


def _bench_module():
    from ep_comm.bench import interconnect
    return interconnect


@needs_extension
def test_bindings_exist():
    assert callable(C.sm_copy) and callable(C.enable_peer_access)
    for name in ("destroy", "destroyed", "ptr", "num_bytes", "rank", "num_ranks", "device", "peer_is_p2p",
                 "put_bench", "pingpong"):
        assert hasattr(C.NvshmemScratch, name), name
    assert "dst_ptr" in C.sm_copy.__doc__ and "with_signal" in C.NvshmemScratch.put_bench.__doc__


@needs_extension
def test_arguments_are_checked_before_the_device():
    with pytest.raises(RuntimeError, match="num_bytes must be positive"):
        C.NvshmemScratch(0, 0, 2, 0)
    with pytest.raises(RuntimeError, match=r"rank 2 is not in \[0, 2\)"):
        C.NvshmemScratch(4096, 2, 2, 0)


@needs_extension
@pytest.mark.skipif(GPU, reason="checks the errors of a machine without a GPU")
def test_without_a_gpu_every_entry_point_raises_runtime_error():
    with pytest.raises(RuntimeError, match="sm_copy needs a CUDA GPU"):
        C.sm_copy(16, 32, 64, 0)
    with pytest.raises(RuntimeError, match="enable_peer_access needs a CUDA GPU"):
        C.enable_peer_access(0, 1)
    with pytest.raises(RuntimeError, match="NvshmemScratch needs a CUDA GPU"):
        C.NvshmemScratch(1 << 20, 0, 2, 0)
    assert issubclass(C.Error, RuntimeError)


def test_bench_reports_nvshmem_rows_as_needing_a_gpu_on_cpu():
    bench = _bench_module()
    rows = bench.measure_nvshmem(0, 2, None, torch.device("cpu"), [4096], 1, 0)  # returns before any collective
    assert [r["name"] for r in rows] == list(bench.NVSHMEM_ROWS)
    assert all(r["status"] == "unavailable: needs a GPU" and r["size_bytes"] is None for r in rows)
    assert bench.measure_nvshmem(1, 2, None, torch.device("cpu"), [4096], 1, 0) == []


def test_bench_scratch_layout_keeps_signals_apart_from_data():
    bench = _bench_module()
    assert bench.SIGNAL_PUT % 8 == 0 and bench.SIGNAL_PING % 8 == 0 and bench.SIGNAL_PUT != bench.SIGNAL_PING
    assert max(bench.SIGNAL_PUT, bench.SIGNAL_PING) + 8 <= bench.PING_MSG
    assert bench.PING_MSG + bench.PING_MAX_BYTES <= bench.PUT_SRC and max(bench.PING_SIZES) <= bench.PING_MAX_BYTES


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and the built extension")
def test_sm_copy_reproduces_its_source():
    seed = 1234
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device="cpu").manual_seed(seed)
    src = torch.randint(0, 256, ((4 << 20) + 64,), dtype=torch.uint8, generator=gen).to(device)
    dst = torch.empty_like(src)
    stream = torch.cuda.current_stream(device).cuda_stream
    for num_bytes in (0, 1, 15, 16, 17, 4099, (1 << 20) + 5, 4 << 20):
        for dst_off, src_off in ((0, 0), (16, 32), (1, 3), (5, 5)):
            for num_blocks in (0, 1, 3):
                dst.zero_()
                C.sm_copy(dst.data_ptr() + dst_off, src.data_ptr() + src_off, num_bytes, device.index, num_blocks,
                          stream)
                torch.cuda.synchronize(device)
                case = f"seed {seed}, {num_bytes} bytes, dst+{dst_off}, src+{src_off}, {num_blocks} blocks"
                assert torch.equal(dst[dst_off:dst_off + num_bytes], src[src_off:src_off + num_bytes]), case
                assert not dst[:dst_off].any() and not dst[dst_off + num_bytes:].any(), case
