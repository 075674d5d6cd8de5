// Bounded spinning. A kernel that waits on a peer (a flag, a counter, a queue tail) checks
// spin_timed_out() in its loop; on timeout it calls report_timeout() and leaves the loop,
// so the kernel ends, the host reads the error slot and raises a readable Python error.
// No __trap(): a trap poisons the CUDA context and the process must die.
//
//   const long long start = global_timer_ns();
//   while (ld_acquire_sys(flag) < expected) {
//     if (spin_timed_out(start, timeout_ns)) {
//       report_timeout(error_slot, rank, kPhaseDispatchRecv, src_rank, expected);
//       break;  // and skip work that needs the data
//     }
//   }
#pragma once

#include "kernels/common/ptx.cuh"
#include "runtime/error_slot.hpp"

namespace ep_comm {

// 100 s: longer than any legitimate wait, short enough that a hang surfaces.
constexpr long long kDefaultTimeoutNs = 100LL * 1000 * 1000 * 1000;

// One clock for the whole device (see ptx::global_timer_ns for why not clock64()).
__device__ __forceinline__ long long global_timer_ns() { return ptx::global_timer_ns(); }

__device__ __forceinline__ bool spin_timed_out(long long start_ns, long long timeout_ns) {
  return global_timer_ns() - start_ns > timeout_ns;
}


// Records the first error in the slot; later reports (other threads, other blocks) are
// dropped. Returns whether this call's report was the one recorded. The claim is a CAS on
// device memory (a CAS on the host-mapped record is not atomic over PCIe); only its winner
// writes the record, whose code it stores last (see runtime/error_slot.hpp).
__device__ __forceinline__ bool report_error(DeviceErrorSlot* slot, int code, int rank, int phase,
                                             int peer, long long detail = 0) {
  if (slot == nullptr) return false;
  if (atomicCAS(&slot->claimed, 0, 1) != 0) return false;
  ErrorSlot* record = slot->record;
  ptx::st_relaxed_sys(&record->rank, rank);
  ptx::st_relaxed_sys(&record->phase, phase);
  ptx::st_relaxed_sys(&record->peer, peer);
  ptx::st_relaxed_sys(&record->detail, detail);
  ptx::st_release_sys(&record->code, code);  // publishes the fields above to the host
  return true;
}

__device__ __forceinline__ bool report_timeout(DeviceErrorSlot* slot, int rank, int phase, int peer,
                                               long long detail = 0) {
  return report_error(slot, kErrorTimeout, rank, phase, peer, detail);
}

// Lets other threads of a kernel stop waiting once any thread gave up: true from the moment a
// writer claimed the slot (its record may still be in flight), for this and later kernels
// until the host resets the slot.
__device__ __forceinline__ bool error_reported(const DeviceErrorSlot* slot) {
  return slot != nullptr && ptx::ld_relaxed_gpu(&slot->claimed) != 0;
}

}  // namespace ep_comm
