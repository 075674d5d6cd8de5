// get_dispatch_layout on the GPU: which ranks each token goes to, and how many tokens each rank,
// node and expert receives. One thread per token; counts go through a shared-memory histogram per
// block and then one global atomic per bin (integer atomics, so the result is deterministic).
#include <cuda_runtime.h>

#include <string>

#include "kernels/layout.hpp"
#include "kernels/common/launch.cuh"
#include "runtime/errors.hpp"

namespace ep_comm {
namespace layout {

constexpr int kThreads = 256;
constexpr int kMaxTopk = 32;
// Histograms up to this many bins live in shared memory; beyond, threads add to global memory.
constexpr int kMaxSharedBins = 8192;

__global__ void __launch_bounds__(kThreads) get_dispatch_layout_kernel(DispatchLayoutArgs args, bool use_shared) {
  EP_DYNAMIC_SHARED(int, s_bins);  // [experts][ranks][nodes]
  const int num_experts = args.num_experts, num_ranks = args.num_ranks;
  const int num_nodes = args.num_tokens_per_rdma_rank != nullptr ? num_ranks / args.ranks_per_node : 0;
  const int num_bins = num_experts + num_ranks + num_nodes;
  const int experts_per_rank = num_experts / num_ranks;
  int* expert_bins = use_shared ? s_bins : args.num_tokens_per_expert;
  int* rank_bins = use_shared ? s_bins + num_experts : args.num_tokens_per_rank;
  int* node_bins = use_shared ? s_bins + num_experts + num_ranks : args.num_tokens_per_rdma_rank;
  if (use_shared) {
    for (int i = threadIdx.x; i < num_bins; i += kThreads) s_bins[i] = 0;
    __syncthreads();
  }

  for (int token = blockIdx.x * kThreads + threadIdx.x; token < args.num_tokens; token += gridDim.x * kThreads) {
    int experts[kMaxTopk];
    const int64_t* row = args.topk_idx + int64_t(token) * args.num_topk;
    for (int k = 0; k < args.num_topk; ++k) experts[k] = int(row[k]);

    bool* in_rank = args.is_token_in_rank + int64_t(token) * num_ranks;
    for (int r = 0; r < num_ranks; ++r) in_rank[r] = false;
    for (int k = 0; k < args.num_topk; ++k) {
      const int expert = experts[k];
      if (expert < 0 || expert >= num_experts) continue;  // -1 = empty slot (validated on the host)
      const int rank = expert / experts_per_rank;
      bool new_expert = true, new_rank = true, new_node = true;
      for (int j = 0; j < k; ++j) {
        const int other = experts[j];
        if (other < 0 || other >= num_experts) continue;
        new_expert &= other != expert;
        new_rank &= other / experts_per_rank != rank;
        if (num_nodes > 0) new_node &= other / experts_per_rank / args.ranks_per_node != rank / args.ranks_per_node;
      }
      if (new_expert) atomicAdd(expert_bins + expert, 1);
      if (new_rank) {
        in_rank[rank] = true;
        atomicAdd(rank_bins + rank, 1);
      }
      if (num_nodes > 0 && new_node) atomicAdd(node_bins + rank / args.ranks_per_node, 1);
    }
  }

  if (use_shared) {
    __syncthreads();
    for (int i = threadIdx.x; i < num_bins; i += kThreads) {
      const int count = s_bins[i];
      if (count == 0) continue;
      if (i < num_experts)
        atomicAdd(args.num_tokens_per_expert + i, count);
      else if (i < num_experts + num_ranks)
        atomicAdd(args.num_tokens_per_rank + (i - num_experts), count);
      else
        atomicAdd(args.num_tokens_per_rdma_rank + (i - num_experts - num_ranks), count);
    }
  }
}

void launch_get_dispatch_layout(const DispatchLayoutArgs& args, cudaStream_t stream) {
  EP_HOST_ASSERT(args.num_ranks > 0 && args.num_experts > 0 && args.num_experts % args.num_ranks == 0,
                 "num_experts (" + std::to_string(args.num_experts) + ") must be a positive multiple of num_ranks (" +
                     std::to_string(args.num_ranks) + ")");
  EP_HOST_ASSERT(args.num_topk >= 0 && args.num_topk <= kMaxTopk,
                 "top-k must be at most " + std::to_string(kMaxTopk) + ", got " + std::to_string(args.num_topk));
  EP_HOST_ASSERT(args.num_tokens >= 0, "num_tokens must be >= 0");
  const bool with_nodes = args.num_tokens_per_rdma_rank != nullptr;
  if (with_nodes)
    EP_HOST_ASSERT(args.ranks_per_node > 0 && args.num_ranks % args.ranks_per_node == 0,
                   "ranks_per_node must divide num_ranks");
  const int num_nodes = with_nodes ? args.num_ranks / args.ranks_per_node : 0;

  EP_CUDA_CHECK(cudaMemsetAsync(args.num_tokens_per_rank, 0, sizeof(int) * args.num_ranks, stream));
  EP_CUDA_CHECK(cudaMemsetAsync(args.num_tokens_per_expert, 0, sizeof(int) * args.num_experts, stream));
  if (with_nodes) EP_CUDA_CHECK(cudaMemsetAsync(args.num_tokens_per_rdma_rank, 0, sizeof(int) * num_nodes, stream));
  if (args.num_tokens == 0) return;

  const int num_bins = args.num_experts + args.num_ranks + num_nodes;
  const bool use_shared = num_bins <= kMaxSharedBins;
  const size_t shared_bytes = use_shared ? sizeof(int) * num_bins : 0;
  int num_blocks = (args.num_tokens + kThreads - 1) / kThreads;
  num_blocks = num_blocks < 1024 ? num_blocks : 1024;
  EP_LAUNCH_KERNEL(get_dispatch_layout_kernel, num_blocks, kThreads, shared_bytes, stream, args, use_shared);
  EP_CUDA_CHECK_LAUNCH();
}

}  // namespace layout
}  // namespace ep_comm
