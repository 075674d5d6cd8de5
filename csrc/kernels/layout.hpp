// Host interface of layout.cu: the dispatch layout computed on the GPU from topk_idx.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace ep_comm {
namespace layout {

struct DispatchLayoutArgs {
  const int64_t* topk_idx;        // [num_tokens, num_topk], -1 = empty slot
  int num_tokens;
  int num_topk;
  int num_ranks;
  int num_experts;                // multiple of num_ranks
  int ranks_per_node;             // for num_tokens_per_rdma_rank; num_ranks within one node
  // outputs (caller-allocated device memory)
  int* num_tokens_per_rank;       // [num_ranks]
  int* num_tokens_per_rdma_rank;  // [num_ranks / ranks_per_node] or nullptr
  int* num_tokens_per_expert;     // [num_experts]
  bool* is_token_in_rank;         // [num_tokens, num_ranks]
};

// Counts are per token: a token naming an expert (or a rank, or a node) in several slots counts
// once, as the reference backend counts. Zeroes the counters itself, on `stream`.
void launch_get_dispatch_layout(const DispatchLayoutArgs& args, cudaStream_t stream);

}  // namespace layout
}  // namespace ep_comm
