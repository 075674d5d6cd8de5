#include "runtime/internode_runtime.hpp"

#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <string>

#include "runtime/errors.hpp"
#include "runtime/nvshmem_runtime.hpp"

namespace ep_comm {

InternodeRuntime::InternodeRuntime(int64_t num_bytes, int rank, int num_ranks, int ranks_per_node, double timeout_s)
    : num_bytes_(num_bytes), rank_(rank), num_ranks_(num_ranks), ranks_per_node_(ranks_per_node) {
  EP_HOST_ASSERT(num_bytes > 0, "internode mode needs num_rdma_bytes > 0 (see Config.get_rdma_buffer_size_hint)");
  EP_HOST_ASSERT(ranks_per_node > 0 && num_ranks % ranks_per_node == 0,
                 "ranks_per_node (" + std::to_string(ranks_per_node) + ") must divide num_ranks (" +
                     std::to_string(num_ranks) + ")");
  EP_HOST_ASSERT(ranks_per_node <= internode::kMaxLocalRanks,
                 "internode mode supports up to " + std::to_string(internode::kMaxLocalRanks) +
                     " ranks per node, got " + std::to_string(ranks_per_node));
  EP_HOST_ASSERT(timeout_s > 0, "timeout must be positive");
  EP_CUDA_CHECK(cudaGetDevice(&device_));
  EP_HOST_ASSERT(nvshmem_runtime::is_initialized() && nvshmem_runtime::my_pe() == rank &&
                     nvshmem_runtime::num_pes() == num_ranks,
                 "initialise NVSHMEM (nvshmem_acquire) for this rank and group before creating an InternodeRuntime");
  // Its own reference, as LowLatencyRuntime takes it: the PE is checked through NVSHMEM itself (of
  // this thread's device), not acquire()'s process-wide rank, so ranks can also be threads of one
  // process (tests/emulator/internode_driver.cpp).
  nvshmem_runtime::add_reference();
  try {
    timeout_ns_ = timeout_ns_from_seconds(timeout_s);
    EP_CUDA_CHECK(cudaMalloc(&epoch_word_, sizeof(uint64_t)));
    EP_CUDA_CHECK(cudaMemset(epoch_word_, 0, sizeof(uint64_t)));
    // Counters start at zero; peers write them only after the host barrier Python runs next.
    buffer_ = nvshmem_runtime::malloc_zeroed(num_bytes, rank);
  } catch (...) {
    if (epoch_word_ != nullptr) cudaFree(epoch_word_);
    epoch_word_ = nullptr;
    buffer_ = nullptr;
    nvshmem_runtime::release();
    throw;
  }
}

InternodeRuntime::~InternodeRuntime() = default;  // destroy() (collective) frees the symmetric buffer

void InternodeRuntime::destroy() {
  if (buffer_ == nullptr) return;
  select_device();
  EP_CUDA_CHECK(cudaDeviceSynchronize());
  nvshmem_free(buffer_);  // collective
  buffer_ = nullptr;
  EP_CUDA_CHECK(cudaFree(epoch_word_));
  epoch_word_ = nullptr;
  nvshmem_runtime::release();
}

void InternodeRuntime::select_device() const {
  int current = -1;
  EP_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device_) EP_CUDA_CHECK(cudaSetDevice(device_));
}

bool InternodeRuntime::local_peers_mapped() const {
  EP_HOST_ASSERT(buffer_ != nullptr, "the internode buffer was destroyed");
  const int node = rank_ / ranks_per_node_;
  for (int l = 0; l < ranks_per_node_; ++l)
    if (nvshmem_ptr(buffer_, node * ranks_per_node_ + l) == nullptr) return false;
  return true;
}

internode::Layout internode_checked_layout(int64_t num_bytes, int64_t hidden_bytes, int num_ranks, int ranks_per_node,
                                           int num_channels, int ring_tokens) {
  EP_HOST_ASSERT(num_channels > 0 && num_channels <= internode::kMaxChannels,
                 "internode mode supports 1.." + std::to_string(internode::kMaxChannels) +
                     " channels (Config.num_sms / 2), got " + std::to_string(num_channels));
  EP_HOST_ASSERT(ring_tokens > 0 && ring_tokens <= internode::kMaxRdmaRingTokens,
                 "num_max_rdma_chunked_recv_tokens must be in 1.." + std::to_string(internode::kMaxRdmaRingTokens));
  EP_HOST_ASSERT(ranks_per_node > 0 && num_ranks % ranks_per_node == 0,
                 "ranks_per_node (" + std::to_string(ranks_per_node) + ") must divide num_ranks (" +
                     std::to_string(num_ranks) + ")");
  const internode::Layout l(hidden_bytes, num_ranks, ranks_per_node, num_channels, ring_tokens);
  EP_HOST_ASSERT(l.total_bytes() <= num_bytes,
                 "internode buffer too small: rows of " + std::to_string(hidden_bytes) + " bytes over " +
                     std::to_string(num_ranks) + " ranks (" + std::to_string(ranks_per_node) + " per node) with " +
                     std::to_string(num_channels) + " channels and " + std::to_string(ring_tokens) +
                     " ring tokens need num_rdma_bytes >= " + std::to_string(l.total_bytes()) + ", but it is " +
                     std::to_string(num_bytes) + " (size it with Config.get_rdma_buffer_size_hint)");
  return l;
}

internode::Layout InternodeRuntime::layout(int64_t hidden_bytes, int num_channels, int ring_tokens) const {
  EP_HOST_ASSERT(buffer_ != nullptr, "the internode buffer was destroyed");
  return internode_checked_layout(num_bytes_, hidden_bytes, num_ranks_, ranks_per_node_, num_channels, ring_tokens);
}

internode::Common InternodeRuntime::common(int64_t hidden_bytes, int num_channels, int ring_tokens) const {
  internode::Common c{buffer_, layout(hidden_bytes, num_channels, ring_tokens), rank_, epoch_word_, 0,
                      error_slot_.device_ptr(), timeout_ns_};
  return c;
}

void InternodeRuntime::notify(int64_t hidden_bytes, int num_channels, int ring_tokens,
                              const internode::NotifyArgs& args, cudaStream_t stream) {
  select_device();
  internode::launch_notify(common(hidden_bytes, num_channels, ring_tokens), args, stream);
}

void InternodeRuntime::dispatch(int64_t hidden_bytes, int num_channels, int ring_tokens,
                                const internode::DispatchArgs& args, cudaStream_t stream) {
  select_device();
  internode::launch_dispatch(common(hidden_bytes, num_channels, ring_tokens), args, stream);
}

void InternodeRuntime::combine(int64_t hidden_bytes, int num_channels, int ring_tokens,
                               const internode::CombineArgs& args, cudaStream_t stream) {
  select_device();
  internode::launch_combine(common(hidden_bytes, num_channels, ring_tokens), args, stream);
}

}  // namespace ep_comm
