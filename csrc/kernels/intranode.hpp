// Host-side interface of the intranode (NVLink, CUDA IPC) kernels in intranode.cu: the argument
// structs (plain data, passed to kernels by value) and the launchers. Included by the runtime and
// the bindings, which are compiled by the host compiler: nothing CUDA-device-specific here.
//
// Protocol in one paragraph (details in intranode.cu):
//   notify   every rank scans is_token_in_rank per channel (a contiguous token range), writes
//            channel_pos[t][r] = position of token t in the ring to rank r, and sends each peer its
//            per-channel and per-local-expert counts as tagged words; the receiver turns them into
//            recv_start[src][channel] (first output row of that ring) and, unless
//            num_worst_tokens is used, into host-mapped counters for the host.
//   dispatch channel c = one sender block + one receiver block per rank. The sender for (c, dst)
//            pushes its tokens, in token order, into the ring (me -> dst, c) that lives in dst's
//            buffer; the receiver for (c, src) copies ring (src -> me, c) in order to rows
//            recv_start[src][c] + position. Output order is therefore source-rank major, channel,
//            then token: ascending token index within a source.
//   combine  the reverse: rank b streams its rows recv_start[a][c].. back through ring (b -> a, c);
//            a's channel-c receiver walks its tokens in order and sums, rank-ascending in float, the
//            rows of the ranks each token went to.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "runtime/error_slot.hpp"

namespace ep_comm {
namespace intranode {

constexpr int kNumMaxRanks = 8;
constexpr int kNumMaxLocalExpertsHost = 1024;  // == kMaxLocalExperts in intranode_layout.cuh

// Call signatures: every kernel publishes one in its start rendezvous (a digest of its kind and
// the sizes that fix the ring layout, computed by Python) and every peer must publish the same.
// They are below 2^31; a rank that recorded an error in an earlier kernel publishes
// kSignaturePeerFailed instead, so its peers skip the call at once rather than time out.
constexpr uint32_t kSignatureLimit = 0x80000000u;
constexpr uint32_t kSignaturePeerFailed = 0xFFFFFFFFu;

// ErrorSlot::code of a rank that stopped waiting because the kernel of a peer (or its own) in the
// same call timed out and broadcast an abort word (intranode_layout.cuh): peer = the rank that
// failed, detail = the abort word's value (pack_abort: that rank's code, phase and peer). Beside
// the shared ErrorCode values (runtime/error_slot.hpp), read only by IpcBuffer::error_message.
constexpr int kErrorPeerAborted = 16;

// Host-mapped (cudaHostAllocMapped): notify writes the receive sizes here so the host learns them
// without synchronising the device. `ready` goes 0 -> 1 after the other fields are written.
struct RecvCounters {
  int ready;
  int num_recv_tokens;
  int num_recv_tokens_per_expert[kNumMaxLocalExpertsHost];  // already rounded up to expert_alignment
};

// What every intranode kernel needs to reach its peers.
struct Context {
  int rank;
  int num_ranks;
  void* buffers[kNumMaxRanks];  // NVLink buffer of every rank in this process's address space
  DeviceErrorSlot* error_slot;  // device half of the error slot (runtime/error_slot.hpp)
  long long timeout_ns;     // every spin-wait gives up after this many global-timer nanoseconds
};

struct NotifyArgs {
  const bool* is_token_in_rank;      // [num_tokens, num_ranks]
  const int* num_tokens_per_expert;  // [num_ranks * num_local_experts], or nullptr (counts 0)
  int num_tokens;
  int num_channels;
  int num_local_experts;
  int expert_alignment;
  int num_worst_tokens;              // 0, or the fixed row count the host allocated
  uint32_t signature;                // all ranks must agree (kind + sizes that fix the ring layout)
  RecvCounters* recv_counters;       // device view of the host-mapped counters, or nullptr
  int num_slots;                     // ring capacity (layout parameter)
  int64_t slot_bytes;                // ring slot size (layout parameter)
  // outputs (device memory the caller owns; reused by dispatch, cached dispatch and combine)
  int* channel_pos;                  // [num_tokens, num_ranks]: exclusive prefix within the channel
  int* send_count;                   // [num_channels, num_ranks]: tokens to each rank per channel
  int* recv_start;                   // [num_ranks * num_channels + 1]: first row of (src, channel)
};

struct DispatchArgs {
  const void* x;                     // [num_tokens, hidden_bytes] (bf16 or fp8 rows)
  const float* x_scales;             // [num_tokens, num_scales] or nullptr
  const int64_t* topk_idx;           // [num_tokens, num_topk] global ids or nullptr (cached mode)
  const float* topk_weights;         // [num_tokens, num_topk] or nullptr
  int num_tokens;
  int64_t hidden_bytes;              // multiple of 16
  int num_scales;
  int num_topk;                      // 0 without topk_idx
  int num_local_experts;             // to translate global ids into the receiver's local ids
  const bool* is_token_in_rank;
  const int* channel_pos;
  const int* send_count;
  const int* recv_start;
  int num_channels;
  int num_slots;
  uint32_t signature;                // all ranks must agree (kind + sizes that fix the ring layout)
  // outputs
  void* recv_x;                      // [num_recv_rows, hidden_bytes]
  float* recv_x_scales;              // [num_recv_rows, num_scales] or nullptr
  int64_t* recv_topk_idx;            // [num_recv_rows, num_topk] or nullptr
  float* recv_topk_weights;          // [num_recv_rows, num_topk] or nullptr
  int num_recv_rows;                 // rows allocated; rows past the received ones are padding
};

struct CombineArgs {
  const void* x;                     // bf16 [>= num_recv, hidden]
  const float* topk_weights;         // [>= num_recv, num_topk] or nullptr
  const void* bias0;                 // bf16 [num_tokens, hidden] or nullptr
  const void* bias1;                 // bf16 [num_tokens, hidden] or nullptr
  int num_tokens;
  int hidden;                        // elements; hidden * 2 is a multiple of 16
  int num_topk;                      // 0 without topk_weights
  const bool* is_token_in_rank;
  const int* channel_pos;
  const int* send_count;
  const int* recv_start;
  int num_channels;
  int num_slots;
  uint32_t signature;                // all ranks must agree (kind + sizes that fix the ring layout)
  // outputs
  void* combined_x;                  // bf16 [num_tokens, hidden]
  float* combined_topk_weights;      // [num_tokens, num_topk] or nullptr
};

// Bytes of NVLink buffer a call with these ring parameters addresses (BufferLayout::total_bytes).
int64_t layout_bytes(int num_ranks, int num_channels, int num_slots, int64_t slot_bytes);
int64_t dispatch_slot_bytes(int64_t hidden_bytes, int num_scales, int num_topk);
int64_t combine_slot_bytes(int64_t hidden_bytes, int num_topk);
// The size hint: a buffer this large serves dispatch (bf16 or FP8, up to 32 top-k) and combine of
// rows up to hidden_bytes with these channels and ring capacity.
int64_t buffer_bytes(int64_t hidden_bytes, int num_ranks, int num_channels, int num_slots);

// Launch on `stream`. Each launch is one "epoch": all ranks must launch the same sequence of
// notify/dispatch/combine kernels on buffers of the same group (they rendezvous at kernel start).
void launch_notify(const Context& ctx, const NotifyArgs& args, cudaStream_t stream);
void launch_dispatch(const Context& ctx, const DispatchArgs& args, cudaStream_t stream);
void launch_combine(const Context& ctx, const CombineArgs& args, cudaStream_t stream);

// Threads per dispatch/combine block (senders and receivers split these warps among ranks).
int dispatch_block_threads();

}  // namespace intranode
}  // namespace ep_comm
