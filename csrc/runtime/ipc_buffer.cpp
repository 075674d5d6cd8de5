#include "runtime/ipc_buffer.hpp"

#include <cuda_runtime_api.h>

#include <chrono>
#include <cstring>
#include <sstream>
#include <thread>

#include "kernels/common/intranode_layout.cuh"
#include "runtime/errors.hpp"

namespace ep_comm {

namespace {

// Switches our CUDA runtime to `device` for the scope (our static cudart keeps its own current
// device, independent of torch's).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    EP_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) EP_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceScope() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) (void)cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
};

}  // namespace

IpcBuffer::IpcBuffer(int rank, int num_ranks, int device, int64_t num_bytes)
    : rank_(rank), num_ranks_(num_ranks), device_(device), num_bytes_(num_bytes) {
  EP_HOST_ASSERT(num_ranks >= 1 && num_ranks <= intranode::kNumMaxRanks,
                 "the intranode buffer supports 1 to " + std::to_string(intranode::kNumMaxRanks) +
                     " ranks in one NVLink domain, got " + std::to_string(num_ranks));
  EP_HOST_ASSERT(rank >= 0 && rank < num_ranks, "rank " + std::to_string(rank) + " out of range");
  EP_HOST_ASSERT(num_bytes > 0, "num_nvl_bytes must be positive");
  EP_CUDA_CHECK(cudaSetDevice(device));
  try {
    error_slot_ = std::make_unique<ErrorSlotHost>();
    EP_CUDA_CHECK(cudaMalloc(&local_, static_cast<size_t>(num_bytes)));
    // Epochs, flags and counters all start at 0 ("nothing yet"); the synchronize makes the zeros
    // land before Python hands the IPC handle to peers, who may write right after opening it.
    EP_CUDA_CHECK(cudaMemset(local_, 0, static_cast<size_t>(num_bytes)));
    EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&counters_host_), sizeof(intranode::RecvCounters),
                                cudaHostAllocMapped));
    std::memset(counters_host_, 0, sizeof(intranode::RecvCounters));
    EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&counters_device_), counters_host_, 0));
    EP_CUDA_CHECK(cudaDeviceSynchronize());
  } catch (...) {
    destroy();
    throw;
  }
  peers_.assign(num_ranks, nullptr);
  peers_[rank] = local_;
}

IpcBuffer::~IpcBuffer() { destroy(); }

std::string IpcBuffer::ipc_handle() const {
  require_usable("ipc_handle");
  DeviceScope scope(device_);
  cudaIpcMemHandle_t handle;
  EP_CUDA_CHECK(cudaIpcGetMemHandle(&handle, local_));
  return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void IpcBuffer::open_peers(const std::vector<std::string>& handles) {
  require_usable("open_peers");
  EP_HOST_ASSERT(!open_, "the peers' buffers are already open");
  EP_HOST_ASSERT(static_cast<int>(handles.size()) == num_ranks_,
                 "expected " + std::to_string(num_ranks_) + " IPC handles, got " + std::to_string(handles.size()));
  DeviceScope scope(device_);
  for (int r = 0; r < num_ranks_; ++r) {
    if (r == rank_) continue;  // a process cannot open its own handle; it has the pointer
    EP_HOST_ASSERT(handles[r].size() == sizeof(cudaIpcMemHandle_t),
                   "IPC handle of rank " + std::to_string(r) + " has " + std::to_string(handles[r].size()) +
                       " bytes, expected " + std::to_string(sizeof(cudaIpcMemHandle_t)));
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, handles[r].data(), sizeof(handle));
    void* ptr = nullptr;
    const cudaError_t status = cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess);
    if (status != cudaSuccess) {
      (void)cudaGetLastError();
      std::ostringstream os;
      os << "rank " << rank_ << " could not open the NVLink buffer of rank " << r
         << " (cudaIpcOpenMemHandle: " << cuda_error_text(status)
         << "); intranode kernels need every rank of the group on GPUs with peer access";
      throw Error(os.str());
    }
    peers_[r] = ptr;
  }
  open_ = true;
}

intranode::Context IpcBuffer::context(double timeout_s) const {
  require_usable("launch");
  EP_HOST_ASSERT(open_, "the peers' NVLink buffers were not opened (open_peers)");
  intranode::Context ctx{};
  ctx.rank = rank_;
  ctx.num_ranks = num_ranks_;
  for (int r = 0; r < intranode::kNumMaxRanks; ++r) ctx.buffers[r] = r < num_ranks_ ? peers_[r] : nullptr;
  ctx.error_slot = error_slot_->device_ptr();
  ctx.timeout_ns = timeout_ns_from_seconds(timeout_s);
  return ctx;
}

void IpcBuffer::activate() const {
  require_usable("activate");
  EP_CUDA_CHECK(cudaSetDevice(device_));
}

intranode::RecvCounters* IpcBuffer::arm_recv_counters() {
  require_usable("arm_recv_counters");
  // The previous notify that reported here was waited for, so nothing writes these now.
  __atomic_store_n(&counters_host_->ready, 0, __ATOMIC_RELEASE);
  return counters_device_;
}

std::pair<int, std::vector<int>> IpcBuffer::wait_recv_counts(int num_local_experts, double timeout_s) const {
  require_usable("wait_recv_counts");
  EP_HOST_ASSERT(num_local_experts >= 0 && num_local_experts <= intranode::kNumMaxLocalExpertsHost,
                 "bad num_local_experts " + std::to_string(num_local_experts));
  const auto start = std::chrono::steady_clock::now();
  // Longer than the device timeout, so that a device-side timeout (which names the peer) is what
  // the user sees; the host limit only catches a kernel that never ran.
  const double limit_s = timeout_s * 1.5 + 10.0;
  // Busy-poll (the counts usually arrive within microseconds and a sleep costs ~50 us of timer
  // slack); after half a second of waiting, back off to sleeping so a stuck peer does not burn a core.
  for (long spins = 0;; ++spins) {
    if (__atomic_load_n(&counters_host_->ready, __ATOMIC_ACQUIRE) != 0) break;
    check_error();
    if (spins % 1024 == 1023) {
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (waited > limit_s) {
        check_error();
        std::ostringstream os;
        os << "ep_comm rank " << rank_ << " timed out on the host after " << waited
           << " s waiting for the receive counts of dispatch (the notify kernel never finished; is the "
              "device busy, or did a peer not call dispatch?)";
        throw Error(os.str());
      }
      if (waited > 0.5) std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }
  check_error();
  std::vector<int> per_expert(num_local_experts);
  for (int e = 0; e < num_local_experts; ++e)
    per_expert[e] = __atomic_load_n(&counters_host_->num_recv_tokens_per_expert[e], __ATOMIC_RELAXED);
  return {__atomic_load_n(&counters_host_->num_recv_tokens, __ATOMIC_RELAXED), per_expert};
}

bool IpcBuffer::has_error() const { return error_slot_ != nullptr && error_slot_->has_error(); }

std::string IpcBuffer::error_message() const {
  if (!has_error()) return "";
  const ErrorSlot s = error_slot_->snapshot();
  std::ostringstream os;
  if (s.code == kErrorInvalidInput && s.phase == kPhaseNotify && s.peer < 0) {
    os << "ep_comm rank " << s.rank << " received " << s.detail
       << " tokens in dispatch, more than num_worst_tokens; raise num_worst_tokens";
  } else if (s.code == kErrorInvalidInput && s.phase == kPhaseBarrier && s.peer >= 0) {
    // The start rendezvous of a kernel: detail = (this rank's signature << 32) | the peer's.
    const auto mine = static_cast<std::uint32_t>(static_cast<unsigned long long>(s.detail) >> 32);
    const auto theirs = static_cast<std::uint32_t>(static_cast<unsigned long long>(s.detail) & 0xffffffffull);
    if (theirs == intranode::kSignaturePeerFailed) {
      os << "ep_comm rank " << s.rank << " skipped an intranode call because rank " << s.peer
         << " had already failed in an earlier call (see rank " << s.peer
         << "'s error: e.g. more rows than num_worst_tokens, a timeout, or mismatched arguments)";
    } else {
      os << "ep_comm rank " << s.rank << " and rank " << s.peer
         << " launched different intranode calls, or the same call with different arguments: every rank must "
            "call dispatch / cached dispatch / combine in the same order, with the same hidden size, dtype, "
            "top-k, FP8 scales, with or without topk_weights, and the same Config (call signature "
         << mine << " here, " << theirs << " on rank " << s.peer << ")";
    }
  } else if (s.code == intranode::kErrorPeerAborted) {
    // detail: the abort word's value, from the rank that failed first in this call.
    const intranode::AbortInfo failed = intranode::unpack_abort(static_cast<std::uint32_t>(s.detail));
    os << "ep_comm rank " << s.rank << " stopped waiting in phase " << phase_name(s.phase) << " because rank "
       << failed.rank << " failed in phase " << phase_name(failed.phase) << " of the same call (rank " << failed.rank;
    if (failed.code == kErrorTimeout) {
      os << " timed out";
      if (failed.peer >= 0) os << " waiting for peer " << failed.peer;
    } else {
      os << " reported device error " << failed.code;
    }
    os << "; see rank " << failed.rank << "'s error)";
  } else {
    os << describe_error(s);
  }
  os << ". The intranode buffer is unusable after this error: destroy the Buffer and create a new one.";
  return os.str();
}

void IpcBuffer::check_error() const {
  if (has_error()) throw Error(error_message());
}

void IpcBuffer::require_usable(const char* what) const {
  if (destroyed_) throw Error(std::string("ep_comm intranode buffer: ") + what + " after destroy()");
}

void IpcBuffer::destroy() noexcept {
  if (destroyed_) return;
  destroyed_ = true;
  int previous = -1;
  const bool have_device = cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(device_) == cudaSuccess;
  if (have_device) {
    // Kernels still running on this device may read or write these buffers (their own waits are
    // bounded by the timeout, so this returns).
    (void)cudaDeviceSynchronize();
    for (int r = 0; r < static_cast<int>(peers_.size()); ++r)
      if (r != rank_ && peers_[r] != nullptr) (void)cudaIpcCloseMemHandle(peers_[r]);
    if (local_ != nullptr) (void)cudaFree(local_);
  }
  if (counters_host_ != nullptr) (void)cudaFreeHost(counters_host_);
  error_slot_.reset();
  peers_.clear();
  local_ = nullptr;
  counters_host_ = nullptr;
  counters_device_ = nullptr;
  open_ = false;
  (void)cudaGetLastError();  // failures here (e.g. a dead context at exit) must not leak into later calls
  if (have_device && previous >= 0 && previous != device_) (void)cudaSetDevice(previous);
}

}  // namespace ep_comm
