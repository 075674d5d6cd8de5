// The internode mode of one Buffer: an NVSHMEM symmetric buffer of num_rdma_bytes (the RDMA rings,
// the NVLink rings reached through nvshmem_ptr, and all counters), a host-mapped error slot, and the
// launchers of kernels/internode.cu. Shares NVSHMEM itself (nvshmem_runtime::acquire) with every
// other Buffer of the process, so low-latency and internode modes can live side by side.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/common/internode_launch.cuh"
#include "kernels/common/internode_layout.cuh"
#include "runtime/error_slot.hpp"

namespace ep_comm {

// The layout of one call; throws ep_comm::Error naming the bytes needed when `num_bytes` is smaller.
// Host only and GPU-free, so the message can be tested on CPU.
internode::Layout internode_checked_layout(int64_t num_bytes, int64_t hidden_bytes, int num_ranks, int ranks_per_node,
                                           int num_channels, int ring_tokens);

class InternodeRuntime {
 public:
  // Collective over all ranks (nvshmem_malloc). Needs nvshmem_runtime::acquire() first; takes its
  // own reference, dropped by destroy().
  InternodeRuntime(int64_t num_bytes, int rank, int num_ranks, int ranks_per_node, double timeout_s);
  ~InternodeRuntime();
  InternodeRuntime(const InternodeRuntime&) = delete;
  InternodeRuntime& operator=(const InternodeRuntime&) = delete;

  // Collective and idempotent: waits for the device, frees the symmetric buffer, releases NVSHMEM.
  void destroy();
  bool destroyed() const { return buffer_ == nullptr; }

  uintptr_t buffer_ptr() const { return reinterpret_cast<uintptr_t>(buffer_); }
  int64_t num_bytes() const { return num_bytes_; }
  long long timeout_ns() const { return timeout_ns_; }
  // Whether every same-node peer's buffer is mapped here (the NVLink leg needs it).
  bool local_peers_mapped() const;

  bool has_error() const { return error_slot_.has_error(); }
  void check_error() const { error_slot_.check_and_throw(); }

  // The layout of a call; throws naming the bytes needed when num_rdma_bytes is too small.
  internode::Layout layout(int64_t hidden_bytes, int num_channels, int ring_tokens) const;

  // Every call is notify, then dispatch or combine, on one stream: notify advances the call number
  // on the device (Common::epoch_word), which the kernel after it reads.
  void notify(int64_t hidden_bytes, int num_channels, int ring_tokens, const internode::NotifyArgs& args,
              cudaStream_t stream);
  void dispatch(int64_t hidden_bytes, int num_channels, int ring_tokens, const internode::DispatchArgs& args,
                cudaStream_t stream);
  void combine(int64_t hidden_bytes, int num_channels, int ring_tokens, const internode::CombineArgs& args,
               cudaStream_t stream);

 private:
  internode::Common common(int64_t hidden_bytes, int num_channels, int ring_tokens) const;
  void select_device() const;

  uint8_t* buffer_ = nullptr;
  uint64_t* epoch_word_ = nullptr;  // device memory: the call number (zero at creation)
  int64_t num_bytes_ = 0;
  ErrorSlotHost error_slot_;
  int device_ = -1;
  int rank_ = 0;
  int num_ranks_ = 0;
  int ranks_per_node_ = 0;
  long long timeout_ns_ = 0;
};

}  // namespace ep_comm
