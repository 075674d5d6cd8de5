// Intranode high-throughput dispatch and combine over NVLink (CUDA IPC peer pointers).
//
// Buffer layout: kernels/common/intranode_layout.cuh. Protocol summary: kernels/intranode.hpp.
//
// Synchronisation, in three rules:
//  1. Every kernel is one epoch and starts with a rendezvous (start_rendezvous): after it, every
//     peer has finished all its earlier kernels, so nobody touches what a previous kernel left in
//     any buffer. This is what makes the buffer reusable without clean-up kernels. The rendezvous
//     also compares the call signature (kind + ring layout) of every rank, and tells peers when
//     this rank failed earlier, so a mismatch or an earlier error skips the call on every rank.
//     A timeout inside a kernel is broadcast at once to every rank's abort word for this epoch,
//     which every wait polls, so the peers stop too, naming the rank that failed and its phase,
//     instead of each waiting out its own timeout (intranode_device.cuh, report_failure).
//  2. Every counter a peer writes is tagged with the epoch ((epoch << 32) | value); a stale word
//     from an earlier kernel reads as 0. So counters never need resetting either.
//  3. A ring (writer -> reader, channel) is single-producer (one warp group of the writer's sender
//     block) and single-consumer (one warp group, or the whole block for combine, of the reader's
//     receiver block). The writer fills slots, synchronises its group, and publishes the new tail
//     with a system-scope release; the reader acquires the tail, copies, synchronises, and
//     publishes the new head the same way. The writer never runs more than num_slots ahead of the
//     head, so a slot is never overwritten before it was read.
//
// Determinism: a ring carries a fixed set of tokens in token order and every position goes to a
// fixed slot and output row, so dispatch is a pure copy whatever the timing. Combine sums each
// token's rows in ascending rank order in float32 (then adds the biases in order, then rounds to
// bf16 once), which is exactly the reference backend's order.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "kernels/common/intranode_device.cuh"
#include "kernels/common/intranode_layout.cuh"
#include "kernels/intranode.hpp"
#include "kernels/common/launch.cuh"
#include "runtime/errors.hpp"

namespace ep_comm {
namespace intranode {

constexpr int kNotifyThreads = 256;
constexpr int kBlockThreads = 768;  // dispatch and combine: 24 warps, split among ranks
constexpr int kBlockWarps = kBlockThreads / 32;
static_assert(kMaxRanks == kNumMaxRanks, "intranode.hpp and intranode_layout.cuh disagree");
static_assert(kMaxLocalExperts == kNumMaxLocalExpertsHost, "intranode.hpp and intranode_layout.cuh disagree");
static_assert(kMaxRanks * kMaxChannels <= kNotifyThreads * 4, "notify scans R*C counts as 4 per thread");

// Ring positions per round: half the ring, so the writer fills one half while the reader drains
// the other. Combine's token-major reader relies on 2 * round <= num_slots (see combine_recv).
__device__ __forceinline__ int round_size(int num_slots) { return num_slots / 2 > 0 ? num_slots / 2 : 1; }

// =============================================================================================
// notify
// =============================================================================================
//
// Blocks 0..C-1: channel c computes channel_pos / send_count for its token range and sends each
// peer "I send you n tokens in channel c". Block C: sends each peer its per-local-expert counts,
// gathers everything peers sent this rank, and produces recv_start and the host-mapped counters.
// (The start rendezvous already checked that all ranks agree on the channel and expert counts.)

__device__ __forceinline__ void notify_channel_block(const Context& ctx, const NotifyArgs& args, const BufferLayout& layout,
                                     uint64_t epoch, int channel) {
  constexpr int kNumWarps = kNotifyThreads / 32;
  __shared__ int s_warp_offset[kNumWarps][kMaxRanks];
  __shared__ int s_running[kMaxRanks];
  const int num_ranks = ctx.num_ranks;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int begin, end;
  channel_token_range(args.num_tokens, args.num_channels, channel, begin, end);

  if (threadIdx.x < kMaxRanks) s_running[threadIdx.x] = 0;
  __syncthreads();
  // One tile of kNotifyThreads tokens per step: ballots give each token its rank within the warp,
  // a scan over warps (one thread per rank) gives the warp offsets.
  for (int tile = begin; tile < end; tile += kNotifyThreads) {
    const int token = tile + threadIdx.x;
    unsigned mask = 0;
    if (token < end) {
      const bool* row = args.is_token_in_rank + int64_t(token) * num_ranks;
      for (int r = 0; r < num_ranks; ++r) mask |= (row[r] ? 1u : 0u) << r;
    }
    int lane_prefix[kMaxRanks];
#pragma unroll
    for (int r = 0; r < kMaxRanks; ++r) {
      const unsigned ballot = __ballot_sync(0xffffffffu, (mask >> r) & 1u);
      lane_prefix[r] = __popc(ballot & ((1u << lane) - 1u));
      if (lane == 0) s_warp_offset[warp][r] = __popc(ballot);
    }
    __syncthreads();
    if (threadIdx.x < num_ranks) {
      const int r = threadIdx.x;
      int running = s_running[r];
      for (int w = 0; w < kNumWarps; ++w) {
        const int count = s_warp_offset[w][r];
        s_warp_offset[w][r] = running;
        running += count;
      }
      s_running[r] = running;
    }
    __syncthreads();
    if (token < end) {
      int* pos = args.channel_pos + int64_t(token) * num_ranks;
#pragma unroll
      for (int r = 0; r < kMaxRanks; ++r)
        if (r < num_ranks) pos[r] = s_warp_offset[warp][r] + lane_prefix[r];
    }
    __syncthreads();
  }

  if (threadIdx.x < num_ranks) {
    const int dst = threadIdx.x;
    const int count = s_running[dst];
    args.send_count[channel * num_ranks + dst] = count;
    ptx::st_release_sys(at<unsigned long long>(ctx.buffers[dst], layout.notify_channel_offset(ctx.rank, channel)),
                        static_cast<unsigned long long>(make_tagged(epoch, uint32_t(count))));
  }
}

__device__ __forceinline__ void notify_meta_block(const Context& ctx, const NotifyArgs& args, const BufferLayout& layout,
                                  uint64_t epoch) {
  __shared__ int s_counts[kMaxRanks * kMaxChannels];
  __shared__ int s_scan_scratch[kNotifyThreads / 32];
  const int num_ranks = ctx.num_ranks, num_channels = args.num_channels;
  const int num_local_experts = args.num_local_experts;

  // 1. Tell every peer how many of my tokens go to each of its local experts.
  for (int i = threadIdx.x; i < num_ranks * num_local_experts; i += kNotifyThreads) {
    const int dst = i / num_local_experts, expert = i % num_local_experts;
    const int count = args.num_tokens_per_expert != nullptr ? args.num_tokens_per_expert[i] : 0;
    ptx::st_release_sys(at<unsigned long long>(ctx.buffers[dst], layout.notify_expert_offset(ctx.rank, expert)),
                        static_cast<unsigned long long>(make_tagged(epoch, uint32_t(count))));
  }

  // 2. Gather what every source sends me.
  bool failed = false;
  for (int i = threadIdx.x; i < num_ranks * num_channels && !failed; i += kNotifyThreads) {
    const int src = i / num_channels, channel = i % num_channels;
    const auto* word = at<const uint64_t>(ctx.buffers[ctx.rank], layout.notify_channel_offset(src, channel));
    const int64_t count = wait_tagged_at_least(word, epoch, 0, ctx, kPhaseNotify, src);
    failed = count < 0;
    s_counts[i] = failed ? 0 : int(count);
  }
  for (int expert = threadIdx.x; expert < num_local_experts && !failed; expert += kNotifyThreads) {
    int64_t sum = 0;
    for (int src = 0; src < num_ranks && !failed; ++src) {
      const auto* word = at<const uint64_t>(ctx.buffers[ctx.rank], layout.notify_expert_offset(src, expert));
      const int64_t count = wait_tagged_at_least(word, epoch, 0, ctx, kPhaseNotify, src);
      failed = count < 0;
      sum += failed ? 0 : count;
    }
    if (args.recv_counters != nullptr && !failed) {
      const int64_t align = args.expert_alignment;
      args.recv_counters->num_recv_tokens_per_expert[expert] = int((sum + align - 1) / align * align);
    }
  }
  if (args.recv_counters != nullptr) ptx::fence_sc_sys();  // host-mapped stores before `ready`
  if (__syncthreads_or(failed)) return;

  // 3. recv_start = exclusive prefix of s_counts in (src, channel) order: the output row order.
  const int num_items = num_ranks * num_channels;
  int local[4], local_sum = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = threadIdx.x * 4 + j;
    local[j] = i < num_items ? s_counts[i] : 0;
    local_sum += local[j];
  }
  int total = 0;
  int running = block_exclusive_sum<kNotifyThreads>(local_sum, s_scan_scratch, total);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = threadIdx.x * 4 + j;
    if (i < num_items) args.recv_start[i] = running;
    running += local[j];
  }
  if (threadIdx.x == 0) {
    args.recv_start[num_items] = total;
    // Sticky: the dispatch kernel queued next publishes "failed" in its rendezvous, so every peer
    // skips that dispatch at once (and reports which peer failed) instead of timing out on us.
    if (args.num_worst_tokens > 0 && total > args.num_worst_tokens)
      report_failure(ctx, epoch, kErrorInvalidInput, kPhaseNotify, -1, total);
    if (args.recv_counters != nullptr) {
      args.recv_counters->num_recv_tokens = total;
      ptx::fence_sc_sys();
      ptx::st_release_sys(&args.recv_counters->ready, 1);
    }
  }
}

__global__ void __launch_bounds__(kNotifyThreads, 1) notify_kernel(Context ctx, NotifyArgs args) {
  const BufferLayout layout(ctx.num_ranks, args.num_channels, args.num_slots, args.slot_bytes);
  bool failed_before;
  const uint64_t epoch = read_epoch(ctx, layout, failed_before);
  if (start_rendezvous(ctx, layout, epoch, args.signature, failed_before)) {
    if (int(blockIdx.x) < args.num_channels)
      notify_channel_block(ctx, args, layout, epoch, blockIdx.x);
    else
      notify_meta_block(ctx, args, layout, epoch);
  }
  finish_epoch(ctx, layout, epoch);
}

// =============================================================================================
// dispatch
// =============================================================================================
//
// Block 2c sends channel c, block 2c+1 receives it. In both, warps are split into one group of
// G = kBlockWarps / R warps per peer rank; group r serves ring (me -> r, c) or (r -> me, c), and
// group-wide barriers use named barrier r + 1.

struct WarpGroup {
  int peer;       // rank this group serves
  int sub;        // warp index within the group
  int num_warps;  // G
  int lane;
  __device__ __forceinline__ bool leader() const { return sub == 0 && lane == 0; }
  __device__ __forceinline__ void sync() const { ptx::named_barrier(peer + 1, num_warps * 32); }
};

__device__ __forceinline__ void dispatch_send(const Context& ctx, const DispatchArgs& args, const BufferLayout& layout,
                              uint64_t epoch, int channel, const WarpGroup& group, volatile int* s_flag) {
  const int num_ranks = ctx.num_ranks, dst = group.peer, lane = group.lane;
  const DispatchSlot slot(args.hidden_bytes, args.num_scales, args.num_topk);
  int begin, end;
  channel_token_range(args.num_tokens, args.num_channels, channel, begin, end);
  const int total = args.send_count[channel * num_ranks + dst];
  if (total == 0) return;

  char* ring = at<char>(ctx.buffers[dst], layout.ring_offset(ctx.rank, channel));
  auto* tail = at<unsigned long long>(ctx.buffers[dst], layout.tail_offset(ctx.rank, channel));
  const auto* head = at<const uint64_t>(ctx.buffers[ctx.rank], layout.head_offset(dst, channel));
  const int num_slots = layout.num_slots;
  const int num_vectors = int(args.hidden_bytes / kVectorBytes);
  const int tile = round_size(num_slots);

  // Rounds over token ranges of `tile` tokens: at most `tile` of them go to dst, so a round never
  // needs more than half the ring.
  int sent = 0;
  for (int round_begin = begin; round_begin < end && sent < total; round_begin += tile) {
    const int round_end = min(round_begin + tile, end);
    const int position_end =
        round_end < end ? args.channel_pos[int64_t(round_end) * num_ranks + dst] : total;
    if (position_end == sent) continue;  // no token of this range goes to dst (uniform in the group)

    if (group.leader()) {
      bool ok = true;
      if (position_end > num_slots)  // wait until the reader freed the slots this round reuses
        ok = wait_tagged_at_least(head, epoch, uint32_t(position_end - num_slots), ctx,
                                  kPhaseDispatchSend, dst) >= 0;
      *s_flag = ok ? 0 : 1;
    }
    group.sync();
    if (*s_flag != 0) break;

    for (int token = round_begin + group.sub; token < round_end; token += group.num_warps) {
      if (!args.is_token_in_rank[int64_t(token) * num_ranks + dst]) continue;
      const int position = args.channel_pos[int64_t(token) * num_ranks + dst];
      char* dst_slot = ring + int64_t(position % num_slots) * layout.slot_bytes;
      warp_copy_to_ring(reinterpret_cast<int4*>(dst_slot),
                        reinterpret_cast<const int4*>(static_cast<const char*>(args.x) + int64_t(token) * args.hidden_bytes),
                        num_vectors, lane);
      if (args.num_scales > 0) {
        float* scales = reinterpret_cast<float*>(dst_slot + slot.scales_offset());
        for (int i = lane; i < args.num_scales; i += 32)
          scales[i] = __ldg(args.x_scales + int64_t(token) * args.num_scales + i);
      }
      if (lane < args.num_topk) {
        const int64_t global = __ldg(args.topk_idx + int64_t(token) * args.num_topk + lane);
        const int64_t local = global - int64_t(dst) * args.num_local_experts;
        const bool mine = global >= 0 && local >= 0 && local < args.num_local_experts;
        reinterpret_cast<int*>(dst_slot + slot.topk_idx_offset())[lane] = mine ? int(local) : -1;
        const float weight =
            (mine && args.topk_weights != nullptr) ? __ldg(args.topk_weights + int64_t(token) * args.num_topk + lane) : 0.0f;
        reinterpret_cast<float*>(dst_slot + slot.topk_weights_offset())[lane] = weight;
      }
    }
    group.sync();  // every warp's slot stores precede the leader's release below
    if (group.leader()) {
      ptx::fence_acq_rel_sys();
      ptx::st_release_sys(tail, static_cast<unsigned long long>(make_tagged(epoch, uint32_t(position_end))));
    }
    sent = position_end;
  }
}

__device__ __forceinline__ void dispatch_recv(const Context& ctx, const DispatchArgs& args, const BufferLayout& layout,
                              uint64_t epoch, int channel, const WarpGroup& group, volatile int* s_flag) {
  const int num_channels = args.num_channels, src = group.peer, lane = group.lane;
  const DispatchSlot slot(args.hidden_bytes, args.num_scales, args.num_topk);
  const int row_base = args.recv_start[src * num_channels + channel];
  const int count = args.recv_start[src * num_channels + channel + 1] - row_base;
  if (count <= 0) return;

  const char* ring = at<const char>(ctx.buffers[ctx.rank], layout.ring_offset(src, channel));
  const auto* tail = at<const uint64_t>(ctx.buffers[ctx.rank], layout.tail_offset(src, channel));
  auto* head = at<unsigned long long>(ctx.buffers[src], layout.head_offset(ctx.rank, channel));
  const int num_slots = layout.num_slots;
  const int num_vectors = int(args.hidden_bytes / kVectorBytes);

  int consumed = 0;
  while (consumed < count) {
    if (group.leader()) {
      const int64_t filled = wait_tagged_at_least(tail, epoch, uint32_t(consumed + 1), ctx, kPhaseDispatchRecv, src);
      *s_flag = filled < 0 ? -1 : (filled < count ? int(filled) : count);
    }
    group.sync();
    const int available = *s_flag;
    if (available < 0) break;

    for (int position = consumed + group.sub; position < available; position += group.num_warps) {
      const int64_t row = int64_t(row_base) + position;
      if (row >= args.num_recv_rows) continue;  // num_worst_tokens too small: notify reported it
      const char* src_slot = ring + int64_t(position % num_slots) * layout.slot_bytes;
      warp_copy_from_ring(reinterpret_cast<int4*>(static_cast<char*>(args.recv_x) + row * args.hidden_bytes),
                          reinterpret_cast<const int4*>(src_slot), num_vectors, lane);
      if (args.num_scales > 0) {
        const float* scales = reinterpret_cast<const float*>(src_slot + slot.scales_offset());
        for (int i = lane; i < args.num_scales; i += 32)
          args.recv_x_scales[row * args.num_scales + i] = ptx::ld_cg(scales + i);
      }
      if (lane < args.num_topk) {
        if (args.recv_topk_idx != nullptr)
          args.recv_topk_idx[row * args.num_topk + lane] =
              ptx::ld_cg(reinterpret_cast<const int*>(src_slot + slot.topk_idx_offset()) + lane);
        if (args.recv_topk_weights != nullptr)
          args.recv_topk_weights[row * args.num_topk + lane] =
              ptx::ld_cg(reinterpret_cast<const float*>(src_slot + slot.topk_weights_offset()) + lane);
      }
    }
    group.sync();  // all reads of these slots are done before the writer may reuse them
    if (group.leader())
      ptx::st_release_sys(head, static_cast<unsigned long long>(make_tagged(epoch, uint32_t(available))));
    consumed = available;
  }
}

__global__ void __launch_bounds__(kBlockThreads, 1) dispatch_kernel(Context ctx, DispatchArgs args) {
  const DispatchSlot slot(args.hidden_bytes, args.num_scales, args.num_topk);
  const BufferLayout layout(ctx.num_ranks, args.num_channels, args.num_slots, slot.bytes());
  __shared__ int s_flags[kMaxRanks];
  bool failed_before;
  const uint64_t epoch = read_epoch(ctx, layout, failed_before);
  const int channel = blockIdx.x / 2;
  const bool is_sender = blockIdx.x % 2 == 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps_per_rank = kBlockWarps / ctx.num_ranks;

  if (start_rendezvous(ctx, layout, epoch, args.signature, failed_before)) {
    const WarpGroup group{warp / warps_per_rank, warp % warps_per_rank, warps_per_rank, lane};
    if (group.peer < ctx.num_ranks) {
      if (is_sender)
        dispatch_send(ctx, args, layout, epoch, channel, group, &s_flags[group.peer]);
      else
        dispatch_recv(ctx, args, layout, epoch, channel, group, &s_flags[group.peer]);
    }
    if (!is_sender) {
      // num_worst_tokens mode: rows [num_recv, num_recv_rows) are padding (zeros, ids -1,
      // weights 0), spread over all receiver warps of all channels.
      const int num_recv = args.recv_start[ctx.num_ranks * args.num_channels];
      const int num_vectors = int(args.hidden_bytes / kVectorBytes);
      for (int64_t row = int64_t(num_recv) + int64_t(channel) * kBlockWarps + warp; row < args.num_recv_rows;
           row += int64_t(args.num_channels) * kBlockWarps) {
        int4* out = reinterpret_cast<int4*>(static_cast<char*>(args.recv_x) + row * args.hidden_bytes);
        for (int i = lane; i < num_vectors; i += 32) ptx::st_na_global(out + i, make_int4(0, 0, 0, 0));
        for (int i = lane; i < args.num_scales; i += 32) args.recv_x_scales[row * args.num_scales + i] = 0.0f;
        if (lane < args.num_topk) {
          if (args.recv_topk_idx != nullptr) args.recv_topk_idx[row * args.num_topk + lane] = -1;
          if (args.recv_topk_weights != nullptr) args.recv_topk_weights[row * args.num_topk + lane] = 0.0f;
        }
      }
    }
  }
  finish_epoch(ctx, layout, epoch);
}

// =============================================================================================
// combine
// =============================================================================================
//
// Block 2c sends channel c (warp groups per destination, as in dispatch), block 2c+1 receives it
// with all its warps: it walks its tokens in rounds of round_size() tokens and, for each token,
// sums the slots of the rings of the ranks the token went to.

__device__ __forceinline__ void combine_send(const Context& ctx, const CombineArgs& args, const BufferLayout& layout,
                             uint64_t epoch, int channel, const WarpGroup& group, volatile int* s_flag) {
  const int num_channels = args.num_channels, dst = group.peer, lane = group.lane;
  const CombineSlot slot(int64_t(args.hidden) * 2, args.num_topk);
  const int row_base = args.recv_start[dst * num_channels + channel];
  const int count = args.recv_start[dst * num_channels + channel + 1] - row_base;
  if (count <= 0) return;

  char* ring = at<char>(ctx.buffers[dst], layout.ring_offset(ctx.rank, channel));
  auto* tail = at<unsigned long long>(ctx.buffers[dst], layout.tail_offset(ctx.rank, channel));
  const auto* head = at<const uint64_t>(ctx.buffers[ctx.rank], layout.head_offset(dst, channel));
  const int num_slots = layout.num_slots;
  const int num_vectors = args.hidden * 2 / int(kVectorBytes);
  const int tile = round_size(num_slots);

  for (int round_begin = 0; round_begin < count; round_begin += tile) {
    const int round_end = min(round_begin + tile, count);
    if (group.leader()) {
      bool ok = true;
      if (round_end > num_slots)
        ok = wait_tagged_at_least(head, epoch, uint32_t(round_end - num_slots), ctx, kPhaseCombineSend, dst) >= 0;
      *s_flag = ok ? 0 : 1;
    }
    group.sync();
    if (*s_flag != 0) break;

    for (int position = round_begin + group.sub; position < round_end; position += group.num_warps) {
      const int64_t row = int64_t(row_base) + position;
      char* dst_slot = ring + int64_t(position % num_slots) * layout.slot_bytes;
      warp_copy_to_ring(reinterpret_cast<int4*>(dst_slot),
                        reinterpret_cast<const int4*>(static_cast<const char*>(args.x) + row * args.hidden * 2),
                        num_vectors, lane);
      if (lane < args.num_topk)
        reinterpret_cast<float*>(dst_slot + slot.topk_weights_offset())[lane] =
            __ldg(args.topk_weights + row * args.num_topk + lane);
    }
    group.sync();
    if (group.leader()) {
      ptx::fence_acq_rel_sys();
      ptx::st_release_sys(tail, static_cast<unsigned long long>(make_tagged(epoch, uint32_t(round_end))));
    }
  }
}

// Deadlock freedom: a round needs positions up to `need` of each ring, at most round_size() past
// what it released; the writer publishes whole rounds of round_size() positions and may run
// num_slots past the released head, and 2 * round_size() <= num_slots, so the round containing
// position need - 1 always fits.
__device__ __forceinline__ void combine_recv(const Context& ctx, const CombineArgs& args, const BufferLayout& layout,
                             uint64_t epoch, int channel) {
  const int num_ranks = ctx.num_ranks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const CombineSlot slot(int64_t(args.hidden) * 2, args.num_topk);
  const int num_vectors = args.hidden * 2 / int(kVectorBytes);
  const int tile = round_size(layout.num_slots);
  int begin, end;
  channel_token_range(args.num_tokens, args.num_channels, channel, begin, end);
  // The slot of the warp's current token in each rank's ring (nullptr: not sent there). In shared
  // memory, not in 16 registers: the summing loop then fits the 80 registers 768 threads allow.
  __shared__ const char* s_slots[kBlockWarps][kMaxRanks];
  const char* const* slots = s_slots[warp];

  // Thread r < R tracks ring (r -> me, channel).
  int released = 0;
  for (int round_begin = begin; round_begin < end; round_begin += tile) {
    const int round_end = min(round_begin + tile, end);
    bool failed = false;
    int need = 0;
    if (threadIdx.x < num_ranks) {
      const int src = threadIdx.x;
      need = round_end < end ? args.channel_pos[int64_t(round_end) * num_ranks + src]
                             : args.send_count[channel * num_ranks + src];
      if (need > released) {
        const auto* tail = at<const uint64_t>(ctx.buffers[ctx.rank], layout.tail_offset(src, channel));
        failed = wait_tagged_at_least(tail, epoch, uint32_t(need), ctx, kPhaseCombineRecv, src) < 0;
      }
    }
    if (__syncthreads_or(failed)) return;

    for (int token = round_begin + warp; token < round_end; token += kBlockWarps) {
      // Lane r knows whether the token went to rank r and where it sits in that ring.
      int in_rank = 0, position = 0;
      if (lane < num_ranks) {
        in_rank = args.is_token_in_rank[int64_t(token) * num_ranks + lane] ? 1 : 0;
        position = args.channel_pos[int64_t(token) * num_ranks + lane];
      }
      const unsigned mask = __ballot_sync(0xffffffffu, in_rank);
      if (lane < kMaxRanks)
        s_slots[warp][lane] = in_rank ? at<const char>(ctx.buffers[ctx.rank], layout.slot_offset(lane, channel, position))
                                      : nullptr;
      __syncwarp();
      const int4* bias0 = args.bias0 == nullptr ? nullptr
                          : reinterpret_cast<const int4*>(static_cast<const char*>(args.bias0) + int64_t(token) * args.hidden * 2);
      const int4* bias1 = args.bias1 == nullptr ? nullptr
                          : reinterpret_cast<const int4*>(static_cast<const char*>(args.bias1) + int64_t(token) * args.hidden * 2);
      int4* out = reinterpret_cast<int4*>(static_cast<char*>(args.combined_x) + int64_t(token) * args.hidden * 2);
      for (int i = lane; i < num_vectors; i += 32) {
        float acc[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
        // Ascending rank: the fixed reduction order. Loads go in two batches of four so that
        // several are in flight without holding eight 16-byte rows in registers.
#pragma unroll
        for (int half = 0; half < kMaxRanks; half += kMaxRanks / 2) {
          int4 rows[kMaxRanks / 2];
#pragma unroll
          for (int r = 0; r < kMaxRanks / 2; ++r)
            if ((mask >> (half + r)) & 1u) rows[r] = ptx::ld_cg_v4(reinterpret_cast<const int4*>(slots[half + r]) + i);
#pragma unroll
          for (int r = 0; r < kMaxRanks / 2; ++r)
            if ((mask >> (half + r)) & 1u) add_bf16x8(acc, rows[r]);
        }
        if (bias0 != nullptr) add_bf16x8(acc, ptx::ld_nc_global(bias0 + i));
        if (bias1 != nullptr) add_bf16x8(acc, ptx::ld_nc_global(bias1 + i));
        ptx::st_na_global(out + i, pack_bf16x8(acc));
      }
      if (args.combined_topk_weights != nullptr && lane < args.num_topk) {
        float weight = 0.0f;
#pragma unroll
        for (int r = 0; r < kMaxRanks; ++r)
          if ((mask >> r) & 1u)
            weight += ptx::ld_cg(reinterpret_cast<const float*>(slots[r] + slot.topk_weights_offset()) + lane);
        args.combined_topk_weights[int64_t(token) * args.num_topk + lane] = weight;
      }
      __syncwarp();  // every lane is done with s_slots[warp] before the next token rewrites it
    }
    __syncthreads();  // every read of this round's slots is done
    if (threadIdx.x < num_ranks && need > released) {
      ptx::st_release_sys(at<unsigned long long>(ctx.buffers[threadIdx.x], layout.head_offset(ctx.rank, channel)),
                          static_cast<unsigned long long>(make_tagged(epoch, uint32_t(need))));
      released = need;
    }
  }
}

__global__ void __launch_bounds__(kBlockThreads, 1) combine_kernel(Context ctx, CombineArgs args) {
  const CombineSlot slot(int64_t(args.hidden) * 2, args.num_topk);
  const BufferLayout layout(ctx.num_ranks, args.num_channels, args.num_slots, slot.bytes());
  __shared__ int s_flags[kMaxRanks];
  bool failed_before;
  const uint64_t epoch = read_epoch(ctx, layout, failed_before);
  const int channel = blockIdx.x / 2;
  const bool is_sender = blockIdx.x % 2 == 0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps_per_rank = kBlockWarps / ctx.num_ranks;

  if (start_rendezvous(ctx, layout, epoch, args.signature, failed_before)) {
    if (is_sender) {
      const WarpGroup group{warp / warps_per_rank, warp % warps_per_rank, warps_per_rank, lane};
      if (group.peer < ctx.num_ranks) combine_send(ctx, args, layout, epoch, channel, group, &s_flags[group.peer]);
    } else {
      combine_recv(ctx, args, layout, epoch, channel);
    }
  }
  finish_epoch(ctx, layout, epoch);
}

// =============================================================================================
// host side
// =============================================================================================

int64_t layout_bytes(int num_ranks, int num_channels, int num_slots, int64_t slot_bytes) {
  return BufferLayout(num_ranks, num_channels, num_slots, slot_bytes).total_bytes();
}
int64_t dispatch_slot_bytes(int64_t hidden_bytes, int num_scales, int num_topk) {
  return DispatchSlot(hidden_bytes, num_scales, num_topk).bytes();
}
int64_t combine_slot_bytes(int64_t hidden_bytes, int num_topk) {
  return CombineSlot(hidden_bytes, num_topk).bytes();
}
int64_t buffer_bytes(int64_t hidden_bytes, int num_ranks, int num_channels, int num_slots) {
  return intranode_buffer_bytes(hidden_bytes, num_ranks, num_channels, num_slots);
}
int dispatch_block_threads() { return kBlockThreads; }

namespace {

void check_context(const Context& ctx) {
  EP_HOST_ASSERT(ctx.num_ranks >= 1 && ctx.num_ranks <= kMaxRanks,
                 "intranode kernels support 1 to " + std::to_string(kMaxRanks) + " ranks, got " +
                     std::to_string(ctx.num_ranks));
  EP_HOST_ASSERT(ctx.rank >= 0 && ctx.rank < ctx.num_ranks, "bad rank " + std::to_string(ctx.rank));
  for (int r = 0; r < ctx.num_ranks; ++r)
    EP_HOST_ASSERT(ctx.buffers[r] != nullptr, "the NVLink buffer of rank " + std::to_string(r) + " is not open");
}

void check_signature(uint32_t signature) {
  EP_HOST_ASSERT(signature < kSignatureLimit, "a call signature must be below 2^31 (the top values are reserved), got " +
                                                  std::to_string(signature));
}

void check_channels(int num_channels, int num_slots) {
  EP_HOST_ASSERT(num_channels >= 1 && num_channels <= kMaxChannels,
                 "intranode kernels support 1 to " + std::to_string(kMaxChannels) +
                     " channels (Config.num_sms / 2), got " + std::to_string(num_channels));
  EP_HOST_ASSERT(num_slots >= 2, "num_max_nvl_chunked_recv_tokens must be at least 2, got " + std::to_string(num_slots));
}

}  // namespace

void launch_notify(const Context& ctx, const NotifyArgs& args, cudaStream_t stream) {
  check_context(ctx);
  check_channels(args.num_channels, args.num_slots);
  check_signature(args.signature);
  EP_HOST_ASSERT(args.num_local_experts >= 0 && args.num_local_experts <= kMaxLocalExperts,
                 "intranode kernels support up to " + std::to_string(kMaxLocalExperts) +
                     " experts per rank, got " + std::to_string(args.num_local_experts));
  EP_HOST_ASSERT(args.expert_alignment >= 1, "expert_alignment must be >= 1");
  EP_LAUNCH_KERNEL(notify_kernel, args.num_channels + 1, kNotifyThreads, 0, stream, ctx, args);
  EP_CUDA_CHECK_LAUNCH();
}

void launch_dispatch(const Context& ctx, const DispatchArgs& args, cudaStream_t stream) {
  check_context(ctx);
  check_channels(args.num_channels, args.num_slots);
  check_signature(args.signature);
  EP_HOST_ASSERT(args.hidden_bytes > 0 && args.hidden_bytes % kVectorBytes == 0,
                 "a row must be a positive multiple of 16 bytes, got " + std::to_string(args.hidden_bytes));
  EP_HOST_ASSERT(args.num_topk >= 0 && args.num_topk <= kMaxTopk, "top-k must be <= 32");
  // A rank without tokens has empty (null) scales and sends no rows.
  EP_HOST_ASSERT(args.num_scales == 0 || args.num_tokens == 0 || args.x_scales != nullptr, "num_scales without scales");
  EP_LAUNCH_KERNEL(dispatch_kernel, args.num_channels * 2, kBlockThreads, 0, stream, ctx, args);
  EP_CUDA_CHECK_LAUNCH();
}

void launch_combine(const Context& ctx, const CombineArgs& args, cudaStream_t stream) {
  check_context(ctx);
  check_channels(args.num_channels, args.num_slots);
  check_signature(args.signature);
  EP_HOST_ASSERT(args.hidden > 0 && (int64_t(args.hidden) * 2) % kVectorBytes == 0,
                 "a bf16 row must be a positive multiple of 16 bytes, got hidden=" + std::to_string(args.hidden));
  EP_HOST_ASSERT(args.num_topk >= 0 && args.num_topk <= kMaxTopk, "top-k must be <= 32");
  EP_LAUNCH_KERNEL(combine_kernel, args.num_channels * 2, kBlockThreads, 0, stream, ctx, args);
  EP_CUDA_CHECK_LAUNCH();
}

}  // namespace intranode
}  // namespace ep_comm
