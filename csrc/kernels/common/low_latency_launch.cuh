// Host-side interface of the low-latency kernels (csrc/kernels/low_latency.cu): the argument
// structs and launchers the bindings call. Plain C++ (no device code), so that .cpp files compiled
// by the host compiler can include it. Pointers are raw device addresses; streams are
// cudaStream_t. No launcher synchronises or allocates: all of them are CUDA-graph capturable.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/common/low_latency_layout.cuh"
#include "runtime/error_slot.hpp"

namespace ep_comm {
namespace low_latency {

// Per-buffer state in ordinary device memory (never touched by peers). It is what makes the
// double-buffer parity live on the device: a captured CUDA graph replays kernels that read the
// epoch here, so every replay continues the sequence instead of repeating captured constants.
struct DeviceState {
  unsigned long long ops_done;           // epoch of the last send kernel that finished (0 = none)
  unsigned int send_blocks_done;         // blocks of the running send kernel that finished
  unsigned int recv_blocks_done[2];      // blocks of the running receive kernel, per half
};

// What every kernel needs besides its own arguments.
struct Common {
  uint8_t* buffer;              // this rank's symmetric buffer (same offsets on every peer)
  Layout layout;
  DeviceState* state;
  DeviceErrorSlot* error_slot;  // device half of the error slot; first device error wins
  int rank;
  int num_sms;                  // grid sizes are capped at this
  uint64_t timeout_ns;          // device waits give up after this long (global timer, not SM cycles)
  bool use_p2p;                 // store directly into peers reachable by nvshmem_ptr
};

struct DispatchSendArgs {
  const void* x;                     // bf16 [num_tokens, hidden], contiguous
  const int64_t* topk_idx;           // [num_tokens, num_topk], -1 = no expert
  int num_tokens;
  int num_topk;
  bool use_fp8;
  bool round_scale;
  int32_t* token_slot;               // out [num_tokens, num_topk]: slot of (token, k) at its expert, -1 if none
  int32_t* send_count;               // out [E]: rows this rank sent to each expert (what combine expects back)
  unsigned long long* call_epoch;    // out [1]: the epoch this op got (read by its receive kernel)
};

struct DispatchRecvArgs {
  const unsigned long long* call_epoch;  // from the matching send
  bool use_fp8;
  bool use_ue8m0;
  void* recv_x;                      // [E_local, R*T, H] float8_e4m3fn or bf16
  void* recv_scales;                 // float32 [E_local, H/128, R*T] or int32 [E_local, H/512, R*T]; fp8 only
  int32_t* recv_count;               // out [E_local]
  int32_t* recv_layout;              // out [E_local, R, 2]: (first row, rows) per source; combine's send plan
  int32_t* cumulative_stats;         // [E_local] += recv_count, or null
};

struct CombineSendArgs {
  const void* x;                     // bf16 [E_local, R*T, H]; ignored with zero_copy
  bool zero_copy;                    // the caller already wrote x into the combine staging area
  const int32_t* recv_layout;        // from the dispatch
  unsigned long long* call_epoch;    // out [1]
};

struct CombineRecvArgs {
  const unsigned long long* call_epoch;
  const int64_t* topk_idx;           // [num_tokens, num_topk]
  const float* topk_weights;         // [num_tokens, num_topk]
  const int32_t* token_slot;         // from the dispatch
  const int32_t* send_count;         // from the dispatch
  int num_tokens;
  int num_topk;
  void* out;                         // bf16 [num_tokens, hidden]
};

void launch_dispatch_send(const Common& common, const DispatchSendArgs& args, cudaStream_t stream);
void launch_dispatch_recv(const Common& common, const DispatchRecvArgs& args, cudaStream_t stream);
void launch_combine_send(const Common& common, const CombineSendArgs& args, cudaStream_t stream);
void launch_combine_recv(const Common& common, const CombineRecvArgs& args, cudaStream_t stream);
// nvshmem_quiet in a one-thread kernel: completes the NVSHMEM operations earlier kernels of this PE
// issued and did not quiet (the receive kernels' acks). Needed before resetting or freeing the buffer.
void launch_quiet(cudaStream_t stream);

}  // namespace low_latency
}  // namespace ep_comm
