// Bindings of the interconnect microbenchmarks (kernels/microbench.cu) for ep_comm/bench/interconnect.py:
//   sm_copy(dst_ptr, src_ptr, num_bytes, device, num_blocks=0, stream=0), enable_peer_access(device, peer)
//   NvshmemScratch(num_bytes, rank, num_ranks, device): a symmetric buffer and its put / ping-pong
//   benchmarks. It takes its own reference on the process's NVSHMEM (initialised first from
//   Python: ep_comm.backends.nvshmem.acquire), as InternodeRuntime does, and gives it back in
//   destroy().
// Pointers and streams travel as Python ints; nothing here knows torch.
#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/registry.hpp"
#include "kernels/microbench.hpp"
#include "runtime/device.hpp"
#include "runtime/error_slot.hpp"
#include "runtime/errors.hpp"
#include "runtime/nvshmem_runtime.hpp"

namespace py = pybind11;

namespace {

namespace mb = ep_comm::microbench;

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// A readable RuntimeError on a machine without a GPU (rather than CUDA's error 35 or 100).
void require_device(const char* what, int device) {
  const int count = ep_comm::device_count();
  EP_HOST_ASSERT(count > 0, std::string(what) + " needs a CUDA GPU, and none is visible (no driver or no device)");
  EP_HOST_ASSERT(0 <= device && device < count, std::string(what) + ": device " + std::to_string(device) +
                                                    " does not exist (" + std::to_string(count) + " visible)");
}

// Makes `device` current for this extension's CUDA runtime (torch's current device is not ours).
void select_device(int device) {
  int current = -1;
  EP_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device) EP_CUDA_CHECK(cudaSetDevice(device));
}

// Lets kernels on `device` access `peer_device`'s memory (including what is mapped from it through
// CUDA IPC). False when the hardware has no P2P path between them. Idempotent.
bool enable_peer_access(int device, int peer_device) {
  require_device("enable_peer_access", device);
  require_device("enable_peer_access", peer_device);
  if (device == peer_device) return true;
  int can_access = 0;
  EP_CUDA_CHECK(cudaDeviceCanAccessPeer(&can_access, device, peer_device));
  if (!can_access) return false;
  select_device(device);
  const cudaError_t status = cudaDeviceEnablePeerAccess(peer_device, 0);
  if (status == cudaErrorPeerAccessAlreadyEnabled) {
    (void)cudaGetLastError();
    return true;
  }
  EP_CUDA_CHECK(status);
  return true;
}

class NvshmemScratch {
 public:
  // Collective over all PEs (nvshmem_malloc): every rank creates its scratch with the same size,
  // in the same order relative to other NVSHMEM allocations.
  NvshmemScratch(int64_t num_bytes, int rank, int num_ranks, int device)
      : num_bytes_(num_bytes), rank_(rank), num_ranks_(num_ranks), device_(device) {
    EP_HOST_ASSERT(num_bytes > 0, "NvshmemScratch: num_bytes must be positive, got " + std::to_string(num_bytes));
    EP_HOST_ASSERT(0 <= rank && rank < num_ranks, "NvshmemScratch: rank " + std::to_string(rank) + " is not in [0, " +
                                                      std::to_string(num_ranks) + ")");
    require_device("NvshmemScratch", device);
    EP_HOST_ASSERT(ep_comm::nvshmem_runtime::is_initialized(),
                   "NvshmemScratch: initialise NVSHMEM first (ep_comm.backends.nvshmem.acquire, as a Buffer does)");
    select_device(device);
    // Our own reference (checks that rank, size and device match the initialised NVSHMEM), so the
    // buffer is always freed before NVSHMEM is finalised.
    ep_comm::nvshmem_runtime::acquire(std::string(), rank, num_ranks, device);
    try {
      // Signal words start at zero; peers write only after the host barrier the caller runs next.
      buffer_ = ep_comm::nvshmem_runtime::malloc_zeroed(num_bytes, rank);
    } catch (...) {
      buffer_ = nullptr;
      ep_comm::nvshmem_runtime::release();
      throw;
    }
  }
  ~NvshmemScratch() = default;  // no collective call from a destructor: destroy() frees the buffer
  NvshmemScratch(const NvshmemScratch&) = delete;
  NvshmemScratch& operator=(const NvshmemScratch&) = delete;

  // Collective and idempotent: completes this PE's puts, frees the buffer, drops the reference.
  void destroy() {
    if (buffer_ == nullptr) return;
    select_device(device_);
    EP_CUDA_CHECK(cudaDeviceSynchronize());
    mb::launch_quiet(nullptr);
    EP_CUDA_CHECK(cudaDeviceSynchronize());
    nvshmem_free(buffer_);  // collective (its barrier orders every PE's quiet before any free)
    buffer_ = nullptr;
    ep_comm::nvshmem_runtime::release();
  }

  bool destroyed() const { return buffer_ == nullptr; }
  uintptr_t ptr() const { return reinterpret_cast<uintptr_t>(buffer_); }
  int64_t num_bytes() const { return num_bytes_; }
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int device() const { return device_; }

  // Whether NVSHMEM maps `pe`'s buffer here (NVLink / P2P / same GPU): its puts are SM stores.
  bool peer_is_p2p(int pe) const {
    check_live();
    check_pe(pe, "pe");
    return nvshmem_ptr(buffer_, pe) != nullptr;
  }

  void put_bench(int64_t dst_offset, int64_t src_offset, int64_t num_bytes, int dst_pe, int iters, bool with_signal,
                 int64_t signal_offset, int num_blocks, uintptr_t stream) {
    check_live();
    check_range(dst_offset, num_bytes, "destination");
    check_range(src_offset, num_bytes, "source");
    check_pe(dst_pe, "dst_pe");
    if (with_signal) check_signal(signal_offset, dst_offset, num_bytes);
    select_device(device_);
    mb::launch_put_bench(buffer_ + dst_offset, buffer_ + src_offset, num_bytes, dst_pe, iters,
                         with_signal ? signal_at(signal_offset) : nullptr, num_blocks, as_stream(stream));
  }

  py::dict pingpong(int64_t msg_offset, int64_t num_bytes, int64_t signal_offset, int peer, bool initiator, int iters,
                    double timeout_s, uintptr_t stream) {
    check_live();
    check_range(msg_offset, num_bytes, "message");
    check_pe(peer, "peer");
    EP_HOST_ASSERT(peer != rank_, "nvshmem pingpong: peer must be another PE than this one (" +
                                      std::to_string(rank_) + ")");
    check_signal(signal_offset, msg_offset, num_bytes);
    EP_HOST_ASSERT(timeout_s > 0, "nvshmem pingpong: timeout_s must be positive");
    select_device(device_);
    mb::PingPongResult r{};
    {
      py::gil_scoped_release release;
      r = mb::run_pingpong(buffer_ + msg_offset, num_bytes, signal_at(signal_offset), peer, initiator, iters,
                           ep_comm::timeout_ns_from_seconds(timeout_s), as_stream(stream));
    }
    if (r.timed_out) {
      throw ep_comm::Error("nvshmem pingpong: rank " + std::to_string(rank_) + " timed out after " +
                           std::to_string(timeout_s) + " s waiting for peer " + std::to_string(peer) + " in round " +
                           std::to_string(r.rounds_done + 1) + " of " + std::to_string(iters + 1) +
                           " (the peer must call pingpong at the same time, with initiator=" +
                           (initiator ? "False" : "True") +
                           "); this scratch buffer's signal words are now undefined: destroy it");
    }
    py::dict d;
    d["elapsed_ns"] = r.elapsed_ns;
    d["round_trips"] = iters;  // timed round trips (the handshake round is not timed)
    return d;
  }

 private:
  void check_live() const {
    EP_HOST_ASSERT(buffer_ != nullptr, "this NvshmemScratch was destroyed");
  }
  void check_pe(int pe, const char* name) const {
    EP_HOST_ASSERT(0 <= pe && pe < num_ranks_, std::string(name) + " " + std::to_string(pe) + " is not in [0, " +
                                                   std::to_string(num_ranks_) + ")");
  }
  void check_range(int64_t offset, int64_t num_bytes, const char* what) const {
    EP_HOST_ASSERT(offset >= 0 && num_bytes > 0 && offset <= num_bytes_ - num_bytes,
                   std::string(what) + " bytes [" + std::to_string(offset) + ", +" + std::to_string(num_bytes) +
                       ") are not inside the scratch buffer of " + std::to_string(num_bytes_) + " bytes");
  }
  // An 8-byte aligned word inside the buffer, apart from the data that travels with it.
  void check_signal(int64_t signal_offset, int64_t data_offset, int64_t data_bytes) const {
    EP_HOST_ASSERT(signal_offset >= 0 && signal_offset % 8 == 0 && signal_offset <= num_bytes_ - 8,
                   "signal_offset " + std::to_string(signal_offset) +
                       " must be a multiple of 8 with 8 bytes inside the scratch buffer of " +
                       std::to_string(num_bytes_) + " bytes");
    EP_HOST_ASSERT(signal_offset + 8 <= data_offset || signal_offset >= data_offset + data_bytes,
                   "signal word at " + std::to_string(signal_offset) + " overlaps the data bytes [" +
                       std::to_string(data_offset) + ", +" + std::to_string(data_bytes) + ")");
  }
  uint64_t* signal_at(int64_t offset) const { return reinterpret_cast<uint64_t*>(buffer_ + offset); }

  uint8_t* buffer_ = nullptr;
  int64_t num_bytes_ = 0;
  int rank_ = 0;
  int num_ranks_ = 0;
  int device_ = -1;
};

}  // namespace

void register_microbench(py::module_& m) {
  m.def(
      "sm_copy",
      [](uintptr_t dst_ptr, uintptr_t src_ptr, int64_t num_bytes, int device, int num_blocks, uintptr_t stream) {
        require_device("sm_copy", device);
        select_device(device);
        mb::launch_sm_copy(reinterpret_cast<void*>(dst_ptr), reinterpret_cast<const void*>(src_ptr), num_bytes,
                           num_blocks, as_stream(stream));
      },
      py::arg("dst_ptr"), py::arg("src_ptr"), py::arg("num_bytes"), py::arg("device"), py::arg("num_blocks") = 0,
      py::arg("stream") = 0,
      "Asynchronous copy of num_bytes by SM loads/stores (16-byte vectors where both pointers are 16-byte "
      "aligned, bytes otherwise) on `stream` of `device`. dst may be a peer's CUDA-IPC mapping: then it "
      "measures P2P/NVLink bandwidth by SM stores. num_blocks <= 0: one per SM (fewer for small copies).");

  m.def("enable_peer_access", &enable_peer_access, py::arg("device"), py::arg("peer_device"),
        "Let kernels on `device` store into `peer_device`'s memory (and its CUDA-IPC mappings); False when "
        "there is no P2P path. Call once before sm_copy into another GPU's memory.");

  py::class_<NvshmemScratch>(m, "NvshmemScratch",
                             "An NVSHMEM symmetric buffer for the put/ping-pong microbenchmarks. Construction and "
                             "destroy() are collective; NVSHMEM must already be initialised "
                             "(ep_comm.backends.nvshmem.acquire).")
      .def(py::init<int64_t, int, int, int>(), py::arg("num_bytes"), py::arg("rank"), py::arg("num_ranks"),
           py::arg("device"), py::call_guard<py::gil_scoped_release>())
      .def("destroy", &NvshmemScratch::destroy, py::call_guard<py::gil_scoped_release>(),
           "Collective and idempotent: quiet, free the symmetric buffer, release this object's NVSHMEM reference.")
      .def_property_readonly("destroyed", &NvshmemScratch::destroyed)
      .def_property_readonly("ptr", &NvshmemScratch::ptr)
      .def_property_readonly("num_bytes", &NvshmemScratch::num_bytes)
      .def_property_readonly("rank", &NvshmemScratch::rank)
      .def_property_readonly("num_ranks", &NvshmemScratch::num_ranks)
      .def_property_readonly("device", &NvshmemScratch::device)
      .def("peer_is_p2p", &NvshmemScratch::peer_is_p2p, py::arg("pe"),
           "Whether nvshmem_ptr maps pe's buffer here (puts to it are SM stores over NVLink/P2P).")
      .def("put_bench", &NvshmemScratch::put_bench, py::arg("dst_offset"), py::arg("src_offset"), py::arg("num_bytes"),
           py::arg("dst_pe"), py::arg("iters"), py::arg("with_signal") = false, py::arg("signal_offset") = 0,
           py::arg("num_blocks") = 0, py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>(),
           "Asynchronous on `stream`: `iters` times, put bytes [src_offset, +num_bytes) of this PE's buffer to "
           "[dst_offset, +num_bytes) of dst_pe's, split over num_blocks blocks (<= 0: one per 32 KiB, at most one "
           "per SM) with nvshmemx_putmem_nbi_block, or putmem_signal_nbi_block adding 1 per block and iteration to "
           "the word at signal_offset on dst_pe when with_signal; then nvshmem_quiet.")
      .def("pingpong", &NvshmemScratch::pingpong, py::arg("msg_offset"), py::arg("num_bytes"),
           py::arg("signal_offset"), py::arg("peer"), py::arg("initiator"), py::arg("iters"),
           py::arg("timeout_s") = 30.0, py::arg("stream") = 0,
           "Synchronous; this PE and `peer` call it together with opposite `initiator`. One untimed handshake "
           "round, then `iters` round trips of a num_bytes put-with-signal each way (one thread per PE). Returns "
           "{'elapsed_ns': device global-timer time of the timed round trips, 'round_trips': iters}; raises "
           "RuntimeError naming rank, peer and round when a wait exceeds timeout_s.");
}
