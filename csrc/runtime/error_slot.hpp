// A host-mapped slot where a kernel records the first error it meets (today: a timeout
// waiting for a peer), so that the host can raise "rank R timed out in phase P waiting for
// peer Q" instead of the process hanging or dying on a device trap.
//
// Protocol (device side in kernels/common/timeout.cuh):
//   writer: CAS code 0 -> kErrorWriting (first error wins), fill rank/phase/peer/detail,
//           fence.sys, then store the real code with release semantics.
//   host:   reads code with acquire; kErrorWriting means "wait, a writer is mid-way".
// The struct is shared by host and device code; keep it trivially copyable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstring>
#include <sstream>
#include <string>
#include <utility>

#include "runtime/errors.hpp"

namespace ep_comm {

struct ErrorSlot {
  int code;          // ErrorCode; 0 = no error
  int rank;          // the rank that saw the error
  int phase;         // Phase
  int peer;          // the rank it was waiting for, -1 if none
  long long detail;  // phase-specific: e.g. the counter value it saw, or a token index
};

enum ErrorCode : int {
  kErrorNone = 0,
  kErrorTimeout = 1,       // waited longer than timeout_ns for a peer
  kErrorInvalidInput = 2,  // the kernel met a value it cannot handle (detail says which)
  kErrorWriting = -1,      // transient: a writer owns the slot and is filling it
};

// Where a kernel was when it failed. Numbers are stable (they travel through the slot and
// into logs); append new phases before kPhaseCount and name them in phase_name().
enum Phase : int {
  kPhaseNone = 0,
  kPhaseNotify = 1,
  kPhaseDispatchSend = 2,
  kPhaseDispatchRecv = 3,
  kPhaseCombineSend = 4,
  kPhaseCombineRecv = 5,
  kPhaseBarrier = 6,
  kPhaseLowLatencyDispatchSend = 7,
  kPhaseLowLatencyDispatchRecv = 8,
  kPhaseLowLatencyCombineSend = 9,
  kPhaseLowLatencyCombineRecv = 10,
  kPhaseInternodeNotify = 11,
  kPhaseInternodeDispatchForward = 12,
  kPhaseInternodeCombineForward = 13,
  kPhaseCleanup = 14,
  kPhaseCount
};

inline const char* phase_name(int phase) {
  switch (phase) {
    case kPhaseNone: return "none";
    case kPhaseNotify: return "notify";
    case kPhaseDispatchSend: return "dispatch-send";
    case kPhaseDispatchRecv: return "dispatch-recv";
    case kPhaseCombineSend: return "combine-send";
    case kPhaseCombineRecv: return "combine-recv";
    case kPhaseBarrier: return "barrier";
    case kPhaseLowLatencyDispatchSend: return "low-latency-dispatch-send";
    case kPhaseLowLatencyDispatchRecv: return "low-latency-dispatch-recv";
    case kPhaseLowLatencyCombineSend: return "low-latency-combine-send";
    case kPhaseLowLatencyCombineRecv: return "low-latency-combine-recv";
    case kPhaseInternodeNotify: return "internode-notify";
    case kPhaseInternodeDispatchForward: return "internode-dispatch-forward";
    case kPhaseInternodeCombineForward: return "internode-combine-forward";
    case kPhaseCleanup: return "cleanup";
    default: return "unknown-phase";
  }
}

// The message check_and_throw() raises; separate so that it can be tested without a GPU.
inline std::string describe_error(const ErrorSlot& s) {
  std::ostringstream os;
  os << "ep_comm rank " << s.rank;
  if (s.code == kErrorTimeout) {
    os << " timed out in phase " << phase_name(s.phase);
    if (s.peer >= 0) os << " waiting for peer " << s.peer;
  } else if (s.code == kErrorInvalidInput) {
    os << " met invalid input in phase " << phase_name(s.phase);
    if (s.peer >= 0) os << " (peer " << s.peer << ")";
  } else {
    os << " reported device error " << s.code << " in phase " << phase_name(s.phase);
    if (s.peer >= 0) os << " (peer " << s.peer << ")";
  }
  os << " [detail " << s.detail << "]";
  return os.str();
}

// Owns one ErrorSlot in pinned, mapped host memory. Construct after the CUDA device is set.
class ErrorSlotHost {
 public:
  ErrorSlotHost() {
    EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_), sizeof(ErrorSlot),
                                cudaHostAllocMapped));
    std::memset(host_, 0, sizeof(ErrorSlot));
    const cudaError_t status = cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_), host_, 0);
    if (status != cudaSuccess) {
      cudaFreeHost(host_);
      host_ = nullptr;
      EP_CUDA_CHECK(status);
    }
  }
  ~ErrorSlotHost() {
    if (host_ != nullptr) cudaFreeHost(host_);  // no throw from a destructor
  }
  ErrorSlotHost(const ErrorSlotHost&) = delete;
  ErrorSlotHost& operator=(const ErrorSlotHost&) = delete;
  ErrorSlotHost(ErrorSlotHost&& other) noexcept
      : host_(std::exchange(other.host_, nullptr)), device_(std::exchange(other.device_, nullptr)) {}
  ErrorSlotHost& operator=(ErrorSlotHost&& other) noexcept {
    if (this != &other) {
      if (host_ != nullptr) cudaFreeHost(host_);
      host_ = std::exchange(other.host_, nullptr);
      device_ = std::exchange(other.device_, nullptr);
    }
    return *this;
  }

  // What kernels get (pass by value as a kernel argument).
  ErrorSlot* device_ptr() const { return device_; }
  // The same memory seen from the host (host-side reports, tests).
  ErrorSlot* host_ptr() const { return host_; }

  // Code as seen now; kErrorWriting while a writer is mid-way.
  int code() const { return __atomic_load_n(&host_->code, __ATOMIC_ACQUIRE); }

  bool has_error() const { return code() != kErrorNone; }

  // A consistent copy once the writer finished (spins briefly through kErrorWriting).
  ErrorSlot snapshot() const {
    int c = code();
    for (long spins = 0; c == kErrorWriting && spins < 100000000L; ++spins) c = code();
    ErrorSlot copy;
    copy.code = c;
    copy.rank = __atomic_load_n(&host_->rank, __ATOMIC_RELAXED);
    copy.phase = __atomic_load_n(&host_->phase, __ATOMIC_RELAXED);
    copy.peer = __atomic_load_n(&host_->peer, __ATOMIC_RELAXED);
    copy.detail = __atomic_load_n(&host_->detail, __ATOMIC_RELAXED);
    return copy;
  }

  // Throws ep_comm::Error describing the recorded error, if any. Call after the kernel's
  // stream synchronised (or while polling: a half-written slot is waited for).
  void check_and_throw() const {
    if (!has_error()) return;
    throw Error(describe_error(snapshot()));
  }

  // Clear for the next launch. Only while no kernel that may write the slot is running.
  void reset() {
    std::memset(host_, 0, sizeof(ErrorSlot));
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
  }

 private:
  ErrorSlot* host_ = nullptr;
  ErrorSlot* device_ = nullptr;
};

// Seconds -> the budget in global-timer nanoseconds that device waits compare against
// (see kernels/common/timeout.cuh), clamped to [1 ns, ~292 years].
inline long long timeout_ns_from_seconds(double timeout_s) {
  const double ns = timeout_s * 1.0e9;
  return ns < 1.0 ? 1 : (ns > 9.0e18 ? static_cast<long long>(9.0e18) : static_cast<long long>(ns));
}

}  // namespace ep_comm
