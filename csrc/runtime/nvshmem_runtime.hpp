// NVSHMEM for ep_comm: process-wide initialisation (reference counted: NVSHMEM can be initialised
// once per process, so every Buffer shares it), the symmetric buffer, and the low-latency runtime
// that owns one such buffer plus the device state and error slot its kernels use.
//
// Rules this file follows (see shared/TOOLCHAIN.md):
//   * Initialise through nvshmemi_init_thread, which returns an error; nvshmemx_init_attr would
//     call exit() on failure.
//   * No host team collectives (team barriers, reductions): they exit the process when several
//     PEs share a GPU without MPS ("limited MPG"). nvshmem_malloc / nvshmem_free /
//     nvshmem_finalize are collective and use only nvshmem_barrier_all internally, which works
//     there. Every rank must call them in the same order.
//   * The host control plane (unique-id exchange, barriers around clean-up) is Python's
//     torch.distributed; nothing here talks to other ranks except through NVSHMEM's own bootstrap.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>

#include "kernels/common/low_latency_launch.cuh"
#include "runtime/error_slot.hpp"

namespace ep_comm {
namespace nvshmem_runtime {

// Bytes of an nvshmemx_uniqueid_t: what rank 0 creates and every rank passes to acquire().
std::size_t unique_id_bytes();

// A fresh unique id (rank 0 only). Needs no GPU.
std::string get_unique_id();

// First call in the process: select `device` and initialise NVSHMEM as PE `rank` of `num_ranks`
// with `unique_id`; later calls check that rank, size and device match and take another
// reference (the id is then ignored): NVSHMEM's PE numbering is fixed at initialisation.
// `group_key` names the group's members (e.g. their global ranks, "0,1,2,3"); when both the
// initialising call and a later one give a key, they must be equal (same size and rank is not
// enough: another group of the same size has other peers). Throws ep_comm::Error (never exits).
//
// An initialisation that fails, or that comes up other than asked (PE numbering), is recorded for
// the life of the process: NVSHMEM cannot be initialised twice (a failed nvshmemi_init_thread
// leaves it half bootstrapped), so every later acquire() throws, naming the first failure. It
// never finalises NVSHMEM itself: nvshmem_finalize is collective, and only the caller knows
// whether every rank can call it (see abandon()). Callers (Python: ep_comm/backends/nvshmem.py)
// agree on the outcome across ranks before anyone goes on to a collective.
void acquire(const std::string& unique_id, int rank, int num_ranks, int device,
             const std::string& group_key = std::string());

// The first failed initialisation of this process, as acquire() reported it; empty if none.
std::string init_failure();

// Whether NVSHMEM is initialised in this process by ep_comm: referenced, or up but abandoned
// (came up wrong) and not finalised yet.
bool initialised_here();

// After an initialising acquire() that failed on some rank (here or on a peer): gives back the
// reference that acquire() took here (if it succeeded here), records `reason` as this process's
// failure (unless one is recorded already), and, when `finalize` is true, finalises the NVSHMEM
// that came up here. `finalize` must be the same on every rank, and true only when NVSHMEM came
// up on every rank (initialised_here() everywhere): nvshmem_finalize is collective. With
// `finalize` false an NVSHMEM that came up here stays up, unused, until the process exits.
// Throws if other references (Buffers) still use NVSHMEM.
void abandon(const std::string& reason, bool finalize);

// Another reference to the NVSHMEM that is already initialised (throws if it is not).
void add_reference();

// Drop a reference; the last one finalises NVSHMEM (collective: all ranks release together).
void release();

int reference_count();
bool is_initialized();

// nvshmemx_init_status(): 0 not initialised, 1 bootstrapped, 2 initialised, 3 limited MPG
// (several PEs per GPU without MPS), 4 full MPG.
int init_status();

int my_pe();
int num_pes();

// Collective (every rank, same size, same order): a symmetric buffer of `num_bytes`, zeroed and
// synchronised, so peers may write into it once every rank is past the caller's next host barrier.
// Throws ep_comm::Error naming `rank` and the size when the symmetric heap is too small.
uint8_t* malloc_zeroed(int64_t num_bytes, int rank);

}  // namespace nvshmem_runtime

// The low-latency mode of one Buffer: an NVSHMEM symmetric buffer of `num_bytes`, a DeviceState
// and a host-mapped error slot. Construction and destroy() are collective over all ranks.
class LowLatencyRuntime {
 public:
  // Needs nvshmem_runtime::acquire() first (it takes its own reference and drops it in destroy()).
  LowLatencyRuntime(int64_t num_bytes, int rank, int num_ranks, bool use_p2p, double timeout_s);
  ~LowLatencyRuntime();  // frees local resources only; the symmetric buffer needs destroy()
  LowLatencyRuntime(const LowLatencyRuntime&) = delete;
  LowLatencyRuntime& operator=(const LowLatencyRuntime&) = delete;

  // Collective and idempotent: waits for the device, frees the symmetric buffer, releases NVSHMEM.
  void destroy();
  bool destroyed() const { return buffer_ == nullptr; }

  uintptr_t buffer_ptr() const { return reinterpret_cast<uintptr_t>(buffer_); }
  int64_t num_bytes() const { return num_bytes_; }
  int num_sms() const { return num_sms_; }
  uint64_t timeout_ns() const { return timeout_ns_; }
  // Whether nvshmem_ptr maps `peer`'s buffer here (NVLink / P2P / same GPU).
  bool peer_is_p2p(int peer) const;

  // Error slot: raise the first device error recorded (no device sync: call it once the work
  // that could have failed is known to be done, or to poll).
  bool has_error() const { return error_slot_.has_error(); }
  void check_error() const { error_slot_.check_and_throw(); }

  // Synchronous and local: waits for the device, then completes every NVSHMEM operation this rank
  // issued (nvshmem_quiet in a kernel: the receive kernels' acks are not quieted). All ranks must
  // call it before the host barrier that precedes clean() (Python does), or a peer's late ack could
  // land after clean() zeroed it.
  void quiet();

  // Synchronous and local: waits for the device, zeroes the control words of the layout for
  // (T, H, E) (and everything before them), the device state and the error slot. All ranks must
  // do it together, with a host barrier before and after (Python does both).
  void clean(int64_t num_max_tokens, int64_t hidden, int64_t num_experts);

  // The layout for (T, H, E); throws if it does not fit the buffer.
  low_latency::Layout layout(int64_t num_max_tokens, int64_t hidden, int64_t num_experts) const;

  void dispatch_send(int64_t num_max_tokens, int64_t hidden, int64_t num_experts,
                     const low_latency::DispatchSendArgs& args, cudaStream_t stream);
  void dispatch_recv(int64_t num_max_tokens, int64_t hidden, int64_t num_experts,
                     const low_latency::DispatchRecvArgs& args, cudaStream_t stream);
  void combine_send(int64_t num_max_tokens, int64_t hidden, int64_t num_experts,
                    const low_latency::CombineSendArgs& args, cudaStream_t stream);
  void combine_recv(int64_t num_max_tokens, int64_t hidden, int64_t num_experts,
                    const low_latency::CombineRecvArgs& args, cudaStream_t stream);

 private:
  low_latency::Common common(int64_t num_max_tokens, int64_t hidden, int64_t num_experts) const;
  void select_device() const;

  uint8_t* buffer_ = nullptr;
  int64_t num_bytes_ = 0;
  low_latency::DeviceState* state_ = nullptr;
  ErrorSlotHost error_slot_;
  int device_ = -1;
  int rank_ = 0;
  int num_ranks_ = 0;
  int num_sms_ = 0;
  uint64_t timeout_ns_ = 0;
  bool use_p2p_ = true;
};

}  // namespace ep_comm
