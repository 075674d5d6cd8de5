// Where everything lives in the low-latency NVSHMEM symmetric buffer: the single function that both
// the host (sizing, Python's size hint, the zero-copy combine view) and the kernels (addressing)
// use, so the two can never disagree. Plain C++ when compiled by the host compiler.
//
// Every rank allocates the same number of bytes with nvshmem_malloc, so an offset computed here
// addresses the same slot in every rank's buffer: a sender computes the offset of a slot in the
// *receiver's* buffer and hands it to nvshmem put (or to nvshmem_ptr for direct P2P stores).
//
//   [control]   uint64 signal words, zero at rest (receivers reset what they consumed)
//     ack               [2 halves][R]          ack[h][p] = how many ops on half h rank p finished
//                                              receiving (p adds 1 in every sender's buffer)
//     dispatch_count    [2][E_local][R]        count + 1 of rows source s sends to local expert e
//     dispatch_arrived  [2][E_local][R]        rows from source s for local expert e that landed
//     combine_arrived   [2][E]                 rows expert e sent back to this rank that landed
//   [dispatch staging]  [T][slot]              this rank's FP8-cast / copied tokens: the source
//                                              of RDMA puts (must be symmetric memory), single
//   [combine staging]   [E_local][R*T][H] bf16 expert outputs to send back: the zero-copy buffer
//   [recv half 0]       E*T slots of 2*H bytes, used by dispatch as [E_local][R][T] messages and
//   [recv half 1]       by combine as [E][T] bf16 rows (one op owns a half at a time)
//
// Ops (dispatches and combines alike) alternate halves by a device-side epoch, see
// low_latency.cu. The staging areas are not double-buffered: every send kernel completes its
// puts (nvshmem_quiet) before it exits, so the next send may overwrite them.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EP_LL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EP_LL_HOST_DEVICE inline
#endif

namespace ep_comm {
namespace low_latency {

constexpr int kMaxTopk = 32;
constexpr int kFp8BlockSize = 128;       // channels per float32 scale
constexpr int kUe8m0ScalesPerWord = 4;   // UE8M0 bytes per packed int32
constexpr int64_t kRegionAlignment = 128;

EP_LL_HOST_DEVICE int64_t align_up(int64_t value, int64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// Bytes of one dispatch message as sent: the bf16 row, or the FP8 row followed by its float32
// scales (UE8M0 packing happens on the receiver), padded to the 16-byte copy granularity.
EP_LL_HOST_DEVICE int64_t dispatch_message_bytes(int64_t hidden, bool use_fp8) {
  return use_fp8 ? align_up(hidden + hidden / kFp8BlockSize * 4, 16) : hidden * 2;
}

struct Layout {
  int64_t num_max_tokens;      // T: num_max_dispatch_tokens_per_rank
  int64_t hidden;              // H
  int64_t num_ranks;           // R
  int64_t num_experts;         // E
  int64_t experts_per_rank;    // E_local = E / R
  int64_t slot_bytes;          // stride of one message / row in the recv halves and staging: 2*H
  int64_t ack_offset;
  int64_t dispatch_count_offset;
  int64_t dispatch_arrived_offset;
  int64_t combine_arrived_offset;
  int64_t control_bytes;
  int64_t dispatch_staging_offset;
  int64_t combine_staging_offset;
  int64_t recv_offset[2];
  int64_t recv_half_bytes;
  int64_t total_bytes;

  // ---- control words (uint64, written by NVSHMEM signal ops or P2P atomics) ----
  EP_LL_HOST_DEVICE uint64_t* ack(uint8_t* base, int half, int peer) const {
    return reinterpret_cast<uint64_t*>(base + ack_offset) + half * num_ranks + peer;
  }
  EP_LL_HOST_DEVICE uint64_t* dispatch_count(uint8_t* base, int half, int local_expert, int src) const {
    return reinterpret_cast<uint64_t*>(base + dispatch_count_offset) +
           (half * experts_per_rank + local_expert) * num_ranks + src;
  }
  EP_LL_HOST_DEVICE uint64_t* dispatch_arrived(uint8_t* base, int half, int local_expert, int src) const {
    return reinterpret_cast<uint64_t*>(base + dispatch_arrived_offset) +
           (half * experts_per_rank + local_expert) * num_ranks + src;
  }
  EP_LL_HOST_DEVICE uint64_t* combine_arrived(uint8_t* base, int half, int expert) const {
    return reinterpret_cast<uint64_t*>(base + combine_arrived_offset) + half * num_experts + expert;
  }

  // ---- payload ----
  EP_LL_HOST_DEVICE uint8_t* dispatch_staging(uint8_t* base, int token) const {
    return base + dispatch_staging_offset + token * slot_bytes;
  }
  // Row `row` of local expert `local_expert` in the [E_local][R*T][H] bf16 combine staging.
  EP_LL_HOST_DEVICE uint8_t* combine_staging(uint8_t* base, int local_expert, int64_t row) const {
    return base + combine_staging_offset + (local_expert * num_ranks * num_max_tokens + row) * slot_bytes;
  }
  // Message `slot` (< T) from source `src` for local expert `local_expert`, in half `half`.
  EP_LL_HOST_DEVICE uint8_t* dispatch_recv(uint8_t* base, int half, int local_expert, int src, int slot) const {
    return base + recv_offset[half] + ((local_expert * num_ranks + src) * num_max_tokens + slot) * slot_bytes;
  }
  // Row `slot` (< T) of global expert `expert` returned to this rank, in half `half`.
  EP_LL_HOST_DEVICE uint8_t* combine_recv(uint8_t* base, int half, int expert, int slot) const {
    return base + recv_offset[half] + (static_cast<int64_t>(expert) * num_max_tokens + slot) * slot_bytes;
  }
};

// Arguments must be positive and num_experts divisible by num_ranks (callers validate).
EP_LL_HOST_DEVICE Layout make_layout(int64_t num_max_tokens, int64_t hidden, int64_t num_ranks,
                                     int64_t num_experts) {
  Layout l{};
  l.num_max_tokens = num_max_tokens;
  l.hidden = hidden;
  l.num_ranks = num_ranks;
  l.num_experts = num_experts;
  l.experts_per_rank = num_experts / num_ranks;
  // One stride for both message kinds: a bf16 row is the larger dispatch message
  // (2H >= H + H/32), and a combine row is bf16 too.
  l.slot_bytes = align_up(hidden * 2, 16);

  int64_t offset = 0;
  // ack first: its position depends on R only, so it never moves when T, H or E change.
  l.ack_offset = offset;
  offset += 2 * num_ranks * 8;
  l.dispatch_count_offset = offset;
  offset += 2 * l.experts_per_rank * num_ranks * 8;
  l.dispatch_arrived_offset = offset;
  offset += 2 * l.experts_per_rank * num_ranks * 8;
  l.combine_arrived_offset = offset;
  offset += 2 * num_experts * 8;
  l.control_bytes = align_up(offset, kRegionAlignment);
  offset = l.control_bytes;

  l.dispatch_staging_offset = offset;
  offset = align_up(offset + num_max_tokens * l.slot_bytes, kRegionAlignment);
  l.combine_staging_offset = offset;
  offset = align_up(offset + l.experts_per_rank * num_ranks * num_max_tokens * l.slot_bytes, kRegionAlignment);

  // E_local * R * T dispatch messages == E * T combine rows, both of slot_bytes.
  l.recv_half_bytes = align_up(num_experts * num_max_tokens * l.slot_bytes, kRegionAlignment);
  l.recv_offset[0] = offset;
  l.recv_offset[1] = offset + l.recv_half_bytes;
  l.total_bytes = offset + 2 * l.recv_half_bytes;
  return l;
}

// What Buffer.get_low_latency_rdma_size_hint returns (via ep_comm._C.low_latency_buffer_bytes).
EP_LL_HOST_DEVICE int64_t buffer_bytes(int64_t num_max_tokens, int64_t hidden, int64_t num_ranks,
                                       int64_t num_experts) {
  return make_layout(num_max_tokens, hidden, num_ranks, num_experts).total_bytes;
}

}  // namespace low_latency
}  // namespace ep_comm
