// Arguments and host launchers of the internode (NVSHMEM between nodes, NVLink inside) kernels.
// Plain structs of pointers and sizes: shared by kernels/internode.cu, runtime/internode_runtime.cpp
// and the bindings, and compilable by g++ (no device code here).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/common/internode_layout.cuh"
#include "runtime/error_slot.hpp"

namespace ep_comm {
namespace internode {

// What every kernel of one call gets.
struct Common {
  uint8_t* buffer;              // this rank's symmetric buffer (same offsets on every rank)
  Layout layout;                // laid out for this call's (hidden, channels, ring tokens)
  int rank;
  // The call number, the same on every rank; tags and flags carry it. It lives on the device: notify
  // advances *epoch_word and the kernels queued after it read it, so a replayed CUDA graph advances
  // it too. `epoch` is set by each kernel at its start (the host's value is ignored).
  uint64_t* epoch_word;
  uint64_t epoch;
  DeviceErrorSlot* error_slot;  // device half of the error slot (runtime/error_slot.hpp)
  long long timeout_ns;
};

// Exchange of counts (and a barrier: every rank waits for every rank's row of this epoch).
struct NotifyArgs {
  int row_ints;                      // 0: barrier only; else R + 1 + num_local_experts
  const int* num_tokens_per_rank;    // [R] tokens this rank sends to each rank
  const int* num_tokens_per_expert;  // [E] tokens this rank sends to each expert
  int num_tokens;                    // this rank's N
  int num_local_experts;
  int* rank_matrix;                  // out [R][R + 1]: row s = s's counts per destination, then N_s
  int* recv_info;                    // out [1 + E_local]: rows this rank receives, then per local expert
  uint32_t signature;                // digest of the call's layout; every rank must pass the same
};

struct DispatchArgs {
  const void* x;                     // [N, hidden_bytes] rows (bf16 or fp8)
  int64_t hidden_bytes;
  const float* x_scales;             // [N, num_scales] with strides, or null
  int num_scales;
  int64_t scale_token_stride, scale_hidden_stride;  // in elements
  const int64_t* topk_idx;           // [N, K] or null (cached mode)
  const float* topk_weights;         // [N, K] or null
  int num_topk;                      // 0 in cached mode
  const bool* is_token_in_rank;      // [N, R]
  const int* token_rank_cumsum;      // [N, R] inclusive cumulative sum of is_token_in_rank over tokens
  const int* rank_matrix;            // [R][R + 1] from notify
  int num_tokens;
  int num_local_experts;
  void* recv_x;                      // [num_recv_rows, hidden_bytes]
  float* recv_x_scales;              // [num_recv_rows, num_scales] or null
  int64_t* recv_topk_idx;            // [num_recv_rows, K] or null
  float* recv_topk_weights;          // [num_recv_rows, K] or null
  int* recv_src_token;               // [num_recv_rows]: token index at its source (the combine handle)
  int num_recv_rows;                 // capacity of the outputs (rows beyond it are an error)
  int rdma_chunk;                    // tokens per RDMA put batch
  int nvl_chunk;                     // tokens per NVL tail publication
};

struct CombineArgs {
  const void* x;                     // bf16 [num_recv_rows, hidden]
  const float* topk_weights;         // [num_recv_rows, K] or null
  int num_topk;
  int hidden;
  const int* rank_matrix;            // [R][R + 1] saved by dispatch
  const int* recv_src_token;         // [num_recv_rows] saved by dispatch
  int num_recv_rows;                 // rows of x and recv_src_token (bounds the rows rank_matrix names)
  const bool* is_token_in_rank;      // [N, R] of this rank's dispatch
  int num_tokens;
  const void* bias0;                 // bf16 [N, hidden] or null
  const void* bias1;
  void* out;                         // bf16 [N, hidden]
  float* out_weights;                // [N, K] or null
  int rdma_chunk;
  int nvl_chunk;
  // Node partials cross the network as float32 (4 bytes per element); otherwise as bf16 (2 bytes,
  // as DeepEP sends them: half the bytes on the NIC, one more rounding). Every rank must agree.
  bool float_partials;
};

// Bytes of one hidden element of a node partial in the combine's RDMA ring.
inline constexpr int combine_partial_bytes(bool float_partials) { return float_partials ? 4 : 2; }

// Warps per block (one block per channel), by role.
constexpr int kDispatchSendWarps = 4;
constexpr int kDispatchForwardWarps = 4;
constexpr int kDispatchRecvWarps = 8;
constexpr int kCombineSendWarps = 4;
constexpr int kCombineForwardWarps = 4;
constexpr int kCombineRecvWarps = 8;

void launch_notify(const Common& common, const NotifyArgs& args, cudaStream_t stream);
void launch_dispatch(const Common& common, const DispatchArgs& args, cudaStream_t stream);
void launch_combine(const Common& common, const CombineArgs& args, cudaStream_t stream);

}  // namespace internode
}  // namespace ep_comm
