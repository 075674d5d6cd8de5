// A host-mapped slot where a kernel records the first error it meets (today: a timeout
// waiting for a peer), so that the host can raise "rank R timed out in phase P waiting for
// peer Q" instead of the process hanging or dying on a device trap.
//
// Two halves: the record (ErrorSlot) in pinned, mapped host memory, which the host reads at any
// time without a device sync; and a claim word in device memory (DeviceErrorSlot, cudaMalloc'd),
// which writers race for. Why a device word: an atomic on host-mapped memory travels over PCIe,
// and PCIe (on x86 hosts) does not make a compare-and-swap atomic, so two writers could both win
// a CAS on the record's code and interleave their fields. A CAS on device memory is atomic among
// this GPU's threads, the only writers of a rank's slot.
//
// Protocol (device side in kernels/common/timeout.cuh):
//   writer: CAS claimed 0 -> 1 on the device word (first error wins; losers drop theirs), fill
//           rank/phase/peer/detail of the host record, then store its code with release.sys
//           semantics (ordered after the fields as by a fence.sys): the host sees the code only
//           once the fields are there.
//   kernels: error_reported() reads the device word (cheap): set from the moment of the claim,
//           the record's fields may still be in flight. Whatever a rank tells peers about its
//           error (intranode's failed flag, abort words) is written by the winner after the code.
//   host:   reads the record's code with acquire (0 = no error), then the fields. reset() clears
//           both halves while no kernel may write the slot.
// ErrorSlot and DeviceErrorSlot are shared by host and device code; keep them trivially copyable.
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
};

// The device half of a slot (see the protocol above); kernels get a pointer to it.
struct DeviceErrorSlot {
  int claimed;        // 0 until a writer wins the slot; only this GPU's threads touch it
  ErrorSlot* record;  // device view of the host-mapped record, fixed for the slot's life
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

// Owns one slot: the record in pinned, mapped host memory and its device half. Construct after
// the CUDA device is set.
class ErrorSlotHost {
 public:
  ErrorSlotHost() {
    try {
      EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_), sizeof(ErrorSlot), cudaHostAllocMapped));
      std::memset(host_, 0, sizeof(ErrorSlot));
      DeviceErrorSlot init{0, nullptr};
      EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&init.record), host_, 0));
      EP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&device_), sizeof(DeviceErrorSlot)));
      EP_CUDA_CHECK(cudaMemcpy(device_, &init, sizeof(DeviceErrorSlot), cudaMemcpyHostToDevice));
    } catch (...) {
      release();
      throw;
    }
  }
  ~ErrorSlotHost() { release(); }
  ErrorSlotHost(const ErrorSlotHost&) = delete;
  ErrorSlotHost& operator=(const ErrorSlotHost&) = delete;
  ErrorSlotHost(ErrorSlotHost&& other) noexcept
      : host_(std::exchange(other.host_, nullptr)), device_(std::exchange(other.device_, nullptr)) {}
  ErrorSlotHost& operator=(ErrorSlotHost&& other) noexcept {
    if (this != &other) {
      release();
      host_ = std::exchange(other.host_, nullptr);
      device_ = std::exchange(other.device_, nullptr);
    }
    return *this;
  }

  // What kernels get (pass by value as a kernel argument): the device half.
  DeviceErrorSlot* device_ptr() const { return device_; }
  // The record as the host sees it (host-side reports, tests).
  ErrorSlot* host_ptr() const { return host_; }

  // Code as seen now: the writer stores it after the other fields.
  int code() const { return __atomic_load_n(&host_->code, __ATOMIC_ACQUIRE); }

  bool has_error() const { return code() != kErrorNone; }

  // A consistent copy: fields read after the code are those the writer published with it.
  ErrorSlot snapshot() const {
    ErrorSlot copy;
    copy.code = code();
    copy.rank = __atomic_load_n(&host_->rank, __ATOMIC_RELAXED);
    copy.phase = __atomic_load_n(&host_->phase, __ATOMIC_RELAXED);
    copy.peer = __atomic_load_n(&host_->peer, __ATOMIC_RELAXED);
    copy.detail = __atomic_load_n(&host_->detail, __ATOMIC_RELAXED);
    return copy;
  }

  // Throws ep_comm::Error describing the recorded error, if any. Call after the kernel's
  // stream synchronised, or while polling (the record shows only once complete).
  void check_and_throw() const {
    if (!has_error()) return;
    throw Error(describe_error(snapshot()));
  }

  // Clear for the next launch: the record and the claim word. Only while no kernel that may
  // write the slot is running; returns once both are clear.
  void reset() {
    std::memset(host_, 0, sizeof(ErrorSlot));
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    EP_CUDA_CHECK(cudaMemset(&device_->claimed, 0, sizeof(device_->claimed)));
    EP_CUDA_CHECK(cudaStreamSynchronize(nullptr));  // the memset may still be queued on return
  }

 private:
  void release() noexcept {  // no throw: runs in the destructor
    if (device_ != nullptr) (void)cudaFree(device_);
    if (host_ != nullptr) (void)cudaFreeHost(host_);
    device_ = nullptr;
    host_ = nullptr;
  }

  ErrorSlot* host_ = nullptr;
  DeviceErrorSlot* device_ = nullptr;
};

// Seconds -> the budget in global-timer nanoseconds that device waits compare against
// (see kernels/common/timeout.cuh), clamped to [1 ns, ~292 years].
inline long long timeout_ns_from_seconds(double timeout_s) {
  const double ns = timeout_s * 1.0e9;
  return ns < 1.0 ? 1 : (ns > 9.0e18 ? static_cast<long long>(9.0e18) : static_cast<long long>(ns));
}

}  // namespace ep_comm
