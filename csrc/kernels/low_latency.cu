// Low-latency dispatch and combine over NVSHMEM (decode, CUDA graphs, receive hooks).
//
// Every op (a dispatch or a combine) is two kernels: a send kernel that never waits for data, and
// a receive kernel that waits for its peers' sends. Between the two, nothing of ours occupies an
// SM, which is what the receive hook relies on.
//
// Protocol (offsets in kernels/common/low_latency_layout.cuh):
//   epoch    Each op gets an epoch n = 1, 2, 3, ... from a counter in device memory
//            (DeviceState::ops_done + 1, advanced by the last block of each send kernel). The op
//            uses recv half n & 1 in every peer. All ranks issue the same sequence of ops, so they
//            agree on n without talking. Parity on the device (not on the host, as a launch
//            argument) keeps a replayed CUDA graph on the right half whatever ran before it.
//   credit   Before writing into half h of any peer, op n's send kernel waits until every peer
//            acknowledged op n-2 (the previous user of half h). ack[h][p] in the sender's buffer
//            counts the ops on half h that peer p finished receiving: a receive kernel ADDs 1 to
//            it in every peer once it has consumed its half. Op n is the ((n+1)/2)-th op on its
//            half, so op n waits for ack[h][p] >= (n-1)/2. (An ADD, not a SET of the epoch: acks
//            are not quieted, and two acks of one rank to one peer from different kernels may
//            land out of order (different QPs); a SET could then leave the older epoch behind
//            and hang the peer's next-but-one op. Adds commute.) So a fast rank can never
//            overwrite a slow rank's half, even with two ops in flight (receive hooks); a third
//            op in flight waits (and times out with a clear phase if the user never calls the
//            first hook).
//   dispatch A source writes each (token, k) row into slot `slot` of [local expert][source] in
//            the expert's rank, where slot = how many earlier (token, k) of this source named that
//            expert (flat token-major order: deterministic, ascending token index). Each row is a
//            put-with-signal that adds 1 to dispatch_arrived[h][e][src] at the receiver, and the
//            source SETs dispatch_count[h][e][src] = rows + 1 once (the +1 makes "0 rows"
//            distinguishable from "not yet"). The receiver lays the rows of expert e out
//            source-rank major: first row of source s = sum of the counts of sources < s.
//   combine  The expert rank sends row i of (expert e, source s) back to s, into
//            combine_recv[h][e][i] (the slot the source chose at dispatch), adding 1 to
//            combine_arrived[h][e]. The source knows how many rows it sent to e (send_count) and
//            waits for as many; it then sums weight * row over k = 0..K-1 in float32, as the
//            reference does (multiply, then add: no FMA), and rounds once to bf16.
//   reset    The last block of a receive kernel zeroes the counters it consumed and then sends
//            the acks, so counters are zero at rest and no separate clean-up kernel is needed.
//
// Data moves with nvshmemx_putmem_signal_nbi_warp (any NVSHMEM transport: IBGDA, IBRC, UCX,
// libfabric) or, where nvshmem_ptr gives a P2P mapping and use_p2p is set, with direct 16-byte
// stores, one system fence per batch of rows (a token's destinations, or an (expert, source)
// pair's rows) and P2P atomic adds after it. Puts read from the staging areas in the
// symmetric heap (registered memory); every send kernel ends with nvshmem_quiet so its staging can
// be reused by the next op.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <string>

#include "kernels/common/low_latency_fp8.cuh"
#include "kernels/common/low_latency_launch.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/timeout.cuh"
#include "kernels/common/launch.cuh"
#include "runtime/errors.hpp"

namespace ep_comm {
namespace low_latency {

namespace {

constexpr int kNumThreads = 256;
constexpr int kNumWarps = kNumThreads / 32;
constexpr int kErrorCheckInterval = 256;  // spins between looks at the timer and the host-mapped error slot

// ---------------------------------------------------------------------------------------------
// Waiting and signalling
// ---------------------------------------------------------------------------------------------

// Spin until *word >= target (acquire, system scope: NVSHMEM and P2P peers write these words).
// On timeout, record (rank, phase, peer, detail) and return false; also give up early once any
// thread recorded an error, so one failure does not cost every waiting thread a full timeout.
__device__ __forceinline__ bool wait_at_least(const uint64_t* word, uint64_t target, const Common& c,
                                              int phase, int peer, long long detail) {
  const long long start = global_timer_ns();
  for (int spins = 0; ptx::ld_acquire_sys(word) < target; ++spins) {
    if (spins % kErrorCheckInterval == kErrorCheckInterval - 1) {
      if (spin_timed_out(start, static_cast<long long>(c.timeout_ns))) {
        report_timeout(c.error_slot, c.rank, phase, peer, detail);
        return false;
      }
      if (error_reported(c.error_slot)) return false;
    }
  }
  return true;
}

// Set a control word in `pe`'s buffer. No ordering with earlier data: callers fence first when
// they need it.
__device__ __forceinline__ void signal_set(uint64_t* word, uint64_t value, int pe, bool use_p2p) {
  if (use_p2p) {
    uint64_t* peer_word = static_cast<uint64_t*>(nvshmem_ptr(word, pe));
    if (peer_word != nullptr) {
      ptx::st_relaxed_sys(peer_word, value);
      return;
    }
  }
  nvshmemx_signal_op(word, value, NVSHMEM_SIGNAL_SET, pe);
}

// Add `value` to a control word in `pe`'s buffer (same ordering caveat as signal_set).
__device__ __forceinline__ void signal_add(uint64_t* word, uint64_t value, int pe, bool use_p2p) {
  if (use_p2p) {
    uint64_t* peer_word = static_cast<uint64_t*>(nvshmem_ptr(word, pe));
    if (peer_word != nullptr) {
      ptx::red_add_relaxed_sys(peer_word, value);
      return;
    }
  }
  nvshmemx_signal_op(word, value, NVSHMEM_SIGNAL_ADD, pe);
}

// Where `pe` maps `ptr` for direct stores (NVLink / P2P / same GPU), or null: then use NVSHMEM.
__device__ __forceinline__ void* p2p_address(void* ptr, int pe, bool use_p2p) {
  return use_p2p ? nvshmem_ptr(ptr, pe) : nullptr;
}

// Warp-collective: copy `num_bytes` (a multiple of 16) to a P2P-mapped peer address. Nothing is
// ordered yet: the caller publishes a batch of rows with one publish_p2p() and then its counter
// adds. `src_read_only` marks caller input that nothing writes during the kernel (read through
// the non-coherent path); staging written earlier by this warp needs coherent loads.
__device__ __forceinline__ void copy_row_p2p(void* peer_dst, const void* src, int64_t num_bytes, bool src_read_only,
                                             int lane) {
  const int4* from = static_cast<const int4*>(src);
  int4* to = static_cast<int4*>(peer_dst);
  const int num_chunks = static_cast<int>(num_bytes / 16);
  if (src_read_only) {
    for (int i = lane; i < num_chunks; i += 32) ptx::st_na_global(to + i, ptx::ld_nc_global(from + i));
  } else {
    for (int i = lane; i < num_chunks; i += 32) ptx::st_na_global(to + i, from[i]);
  }
}

// Warp-collective, after copy_row_p2p calls: every lane's stores happen-before lane 0's system
// fence (warp barrier), and the fence orders them before the counter adds lane 0 issues next,
// which the receiver acquires. One fence per batch, not per row: fences are the expensive part.
__device__ __forceinline__ void publish_p2p(int lane) {
  __syncwarp();
  if (lane == 0) __threadfence_system();
  __syncwarp();
}

// Warp-collective, before the first NVSHMEM put from staging this warp just wrote: the NIC (or
// NVSHMEM's proxy) reads the source from memory, so the stores must be visible beyond the SM.
__device__ __forceinline__ void publish_staging(int lane) {
  __threadfence_system();
  __syncwarp();
}

// Warp-collective: put `num_bytes` from local symmetric `src` to `dst` in `pe`'s buffer and add 1
// to `counter` there once the data has landed (NVSHMEM's put-with-signal ordering; any transport).
__device__ __forceinline__ void put_row_with_count(void* dst, const void* src, int64_t num_bytes, uint64_t* counter,
                                                   int pe) {
  nvshmemx_putmem_signal_nbi_warp(dst, src, static_cast<size_t>(num_bytes), counter, 1, NVSHMEM_SIGNAL_ADD, pe);
}

// Block-collective, at the start of a send kernel: this op's epoch, after waiting until every
// peer released the half this op is about to write (acked op epoch - 2). `may_send` is false when
// a wait failed (timed out, or another thread reported an error): the block must then write
// nothing into any peer, because a slow peer's half may still hold an op it has not received,
// and it would receive our rows as that op's, silently. Its peers time out instead.
__device__ __forceinline__ uint64_t begin_send(const Common& c, unsigned long long* call_epoch, int phase,
                                               bool& may_send) {
  const uint64_t epoch = ptx::ld_relaxed_gpu(&c.state->ops_done) + 1;
  const int half = static_cast<int>(epoch & 1);
  if (blockIdx.x == 0 && threadIdx.x == 0) *call_epoch = epoch;
  bool failed = false;
  if (epoch > 2) {
    // ack[half][peer] counts ops on this half that `peer` finished receiving; op epoch-2 is the
    // ((epoch-1)/2)-th of them (see the protocol comment at the top).
    const uint64_t acks_needed = (epoch - 1) / 2;
    for (int peer = threadIdx.x; peer < c.layout.num_ranks; peer += blockDim.x)
      failed |= !wait_at_least(c.layout.ack(c.buffer, half, peer), acks_needed, c, phase, peer,
                               static_cast<long long>(epoch));
  }
  may_send = !__syncthreads_or(failed);
  return epoch;
}

// Block-collective, at the end of a send kernel: complete this block's puts (so staging can be
// reused), and let the last block advance the epoch for the next op.
__device__ __forceinline__ void end_send(const Common& c, uint64_t epoch) {
  // nvshmem_quiet completes every operation this PE issued (all QPs / the whole proxy channel),
  // not only the calling thread's: one call per block, after the barrier that orders every warp's
  // puts before it, is enough. (One per warp made up to 8x as many threads each walk every QP.)
  __syncthreads();
  if (threadIdx.x == 0) {
    nvshmem_quiet();
    __threadfence();
    if (atomicAdd(&c.state->send_blocks_done, 1u) == gridDim.x - 1) {
      // Acquire the other blocks' adds (a fence after the relaxed RMW); the counter is only ever
      // accessed atomically. Every block read ops_done before arriving here, so the update cannot
      // race a reader.
      __threadfence();
      ptx::st_relaxed_gpu(&c.state->send_blocks_done, 0u);
      ptx::st_relaxed_gpu(&c.state->ops_done, static_cast<unsigned long long>(epoch));
    }
  }
}

// Block-collective, at the end of a receive kernel: returns true in exactly one block, the last
// to finish, after all other blocks are done with the half.
__device__ __forceinline__ bool is_last_recv_block(const Common& c, int half) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&c.state->recv_blocks_done[half], 1u) == gridDim.x - 1;
    if (last) {
      // Acquire: the other blocks' work on `half` comes before the reset and what the caller does
      // next; the counter is only ever accessed atomically; send_acks' system fence publishes it.
      __threadfence();
      ptx::st_relaxed_gpu(&c.state->recv_blocks_done[half], 0u);
    }
  }
  __syncthreads();
  return last != 0;
}

// Block-collective, by the last receive block after it zeroed the counters of `half`: make the
// zeros visible system-wide, then tell every peer that this rank is done with one more op on
// `half` (ADD 1: see the credit paragraph at the top for why not SET).
// The fence comes after the barrier, in every thread that then signals: the zeros were written by
// other threads of the block, and only a fence in the signalling thread, after it observed them
// through the barrier, orders them (cumulatively) before its relaxed signal at system scope.
__device__ __forceinline__ void send_acks(const Common& c, int half) {
  __syncthreads();
  __threadfence_system();
  for (int peer = threadIdx.x; peer < c.layout.num_ranks; peer += blockDim.x)
    signal_add(c.layout.ack(c.buffer, half, c.rank), 1, peer, c.use_p2p);
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

// grid: token ranges of `tokens_per_block`; block: kNumThreads.
// dynamic smem: int rows_before[E], rows_total[E], slots[tokens_per_block * K], experts[same].
__global__ void __launch_bounds__(kNumThreads) dispatch_send_kernel(Common c, DispatchSendArgs a,
                                                                    int tokens_per_block) {
  const Layout& l = c.layout;
  const int num_experts = static_cast<int>(l.num_experts);
  const int experts_per_rank = static_cast<int>(l.experts_per_rank);
  const int num_topk = a.num_topk;
  const int tid = threadIdx.x, warp = tid / 32, lane = ptx::lane_id();
  const int first_token = blockIdx.x * tokens_per_block;
  const int end_token = min(first_token + tokens_per_block, a.num_tokens);

  EP_DYNAMIC_SHARED(int, smem);
  int* rows_before = smem;                  // rows to each expert from tokens before this block's range
  int* rows_total = smem + num_experts;     // rows to each expert from all tokens
  int* block_slots = rows_total + num_experts;
  int* block_experts = block_slots + tokens_per_block * num_topk;

  // Bad input found while counting (before the credit wait) is reported at the end (finish()).
  __shared__ int invalid_seen;
  __shared__ long long invalid_detail;
  auto note_invalid = [&](long long detail) {
    if (atomicExch(&invalid_seen, 1) == 0) invalid_detail = detail;
  };
  if (tid == 0) invalid_seen = 0;

  // Counting does not touch the peers, so it overlaps the wait for their credits below.
  for (int i = tid; i < 2 * num_experts; i += blockDim.x) smem[i] = 0;
  __syncthreads();
  // One pass over all (token, k): per-expert totals, the rows before this block's range, and a
  // copy of this block's own entries (-1 for none) for the slot walk below.
  const int num_entries = a.num_tokens * num_topk;
  const int block_begin = first_token * num_topk, block_end = end_token * num_topk;
  for (int i = tid; i < num_entries; i += blockDim.x) {
    const int64_t expert = a.topk_idx[i];
    const bool valid = expert >= 0 && expert < num_experts;
    if (i >= block_begin && i < block_end) {
      block_experts[i - block_begin] = valid ? static_cast<int>(expert) : -1;
      // The host does not read topk_idx (no host sync in low-latency mode): an id out of range is
      // noted here (the entry is skipped) and the next call, hook or check_errors() raises.
      if (expert < -1 || expert >= num_experts) note_invalid(expert);
    }
    if (!valid) continue;
    atomicAdd(&rows_total[expert], 1);
    if (i < block_begin) atomicAdd(&rows_before[expert], 1);
  }
  __syncthreads();

  // Slots of this block's (token, k), in flat order: warp 0 walks its tokens one at a time with
  // lane k holding slot k. Experts must be distinct within a token; the host does not check (it
  // would have to read topk_idx), so a repeat is reported here. Its rows are still sent, ordered
  // by k, so that the counts every receiver waits for stay consistent.
  if (warp == 0) {
    for (int token = first_token; token < end_token; ++token) {
      const int local = (token - first_token) * num_topk + lane;
      const int key = lane < num_topk ? block_experts[local] : -1;
      const bool valid = key >= 0;
      const unsigned same = __match_any_sync(0xffffffffu, key);
      const int rank_in_same = __popc(same & ((1u << lane) - 1u));
      int slot = valid ? rows_before[key] + rank_in_same : -1;
      if (valid && rank_in_same > 0) note_invalid(token);
      __syncwarp();
      if (valid && rank_in_same == 0) rows_before[key] += __popc(same);
      __syncwarp();
      if (slot >= l.num_max_tokens) {
        // More rows for one expert than a source may send (T): a repeated expert in one token.
        note_invalid(token);
        slot = -1;
      }
      if (lane < num_topk) {
        block_slots[local] = slot;
        block_experts[local] = slot >= 0 ? key : -1;
        a.token_slot[static_cast<int64_t>(token) * num_topk + lane] = slot;
      }
    }
  }

  bool may_send = false;
  const uint64_t epoch = begin_send(c, a.call_epoch, kPhaseLowLatencyDispatchSend, may_send);
  const int half = static_cast<int>(epoch & 1);
  // Bad input is reported only once this block's rows are out: an error in the slot makes waits
  // give up early, and this op's rows must go out (or not) by the credits alone.
  auto finish = [&] {
    if (tid == 0 && invalid_seen)
      report_error(c.error_slot, kErrorInvalidInput, c.rank, kPhaseLowLatencyDispatchSend, -1, invalid_detail);
    end_send(c, epoch);
  };
  if (!may_send) {
    finish();
    return;
  }

  // Counts first (one SET per expert, spread over all threads of the grid): receivers can lay
  // out their output while the rows are still in flight.
  for (int expert = blockIdx.x * blockDim.x + tid; expert < num_experts; expert += gridDim.x * blockDim.x) {
    const int rows = min(rows_total[expert], static_cast<int>(l.num_max_tokens));
    a.send_count[expert] = rows;
    const int dst = expert / experts_per_rank;
    signal_set(l.dispatch_count(c.buffer, half, expert % experts_per_rank, c.rank), static_cast<uint64_t>(rows) + 1,
               dst, c.use_p2p);
  }

  // Rows: one warp per token. Cast (or copy) it once into staging, then send it to each expert.
  const int64_t message_bytes = dispatch_message_bytes(l.hidden, a.use_fp8);
  const int hidden = static_cast<int>(l.hidden);
  for (int token = first_token + warp; token < end_token; token += kNumWarps) {
    uint8_t* staging = l.dispatch_staging(c.buffer, token);
    const int4* x_row = reinterpret_cast<const int4*>(static_cast<const __nv_bfloat16*>(a.x) +
                                                      static_cast<int64_t>(token) * hidden);
    if (a.use_fp8) {
      cast_row_to_fp8(x_row, staging, reinterpret_cast<float*>(staging + hidden), hidden, a.round_scale, lane);
    } else {
      int4* to = reinterpret_cast<int4*>(staging);
      for (int i = lane; i < hidden / 8; i += 32) to[i] = ptx::ld_nc_global(x_row + i);
    }
    __syncwarp();
    // Which destinations take direct stores; the rest go through NVSHMEM.
    const int first_local = (token - first_token) * num_topk;
    unsigned p2p_slots = 0, rdma_slots = 0;
    for (int k = 0; k < num_topk; ++k) {
      const int expert = block_experts[first_local + k];
      if (expert < 0) continue;
      void* dst = l.dispatch_recv(c.buffer, half, expert % experts_per_rank, c.rank, block_slots[first_local + k]);
      if (p2p_address(dst, expert / experts_per_rank, c.use_p2p) != nullptr) p2p_slots |= 1u << k;
      else rdma_slots |= 1u << k;
    }
    // Network puts first: they are asynchronous, so the P2P copies below overlap them.
    if (rdma_slots != 0) publish_staging(lane);
    for (unsigned rest = rdma_slots; rest != 0; rest &= rest - 1) {
      const int k = __ffs(rest) - 1;
      const int expert = block_experts[first_local + k];
      const int local_expert = expert % experts_per_rank;
      put_row_with_count(l.dispatch_recv(c.buffer, half, local_expert, c.rank, block_slots[first_local + k]), staging,
                         message_bytes, l.dispatch_arrived(c.buffer, half, local_expert, c.rank),
                         expert / experts_per_rank);
    }
    for (unsigned rest = p2p_slots; rest != 0; rest &= rest - 1) {
      const int k = __ffs(rest) - 1;
      const int expert = block_experts[first_local + k];
      const int dst = expert / experts_per_rank;
      void* peer = p2p_address(l.dispatch_recv(c.buffer, half, expert % experts_per_rank, c.rank,
                                               block_slots[first_local + k]), dst, true);
      copy_row_p2p(peer, staging, message_bytes, false, lane);
    }
    if (p2p_slots != 0) {
      publish_p2p(lane);
      if (lane == 0) {
        for (unsigned rest = p2p_slots; rest != 0; rest &= rest - 1) {
          const int expert = block_experts[first_local + __ffs(rest) - 1];
          auto* counter = static_cast<uint64_t*>(p2p_address(
              l.dispatch_arrived(c.buffer, half, expert % experts_per_rank, c.rank), expert / experts_per_rank, true));
          ptx::red_add_relaxed_sys(counter, static_cast<uint64_t>(1));
        }
      }
      __syncwarp();
    }
  }
  finish();
}

// grid: experts_per_rank * blocks_per_expert; block (e, p) serves local expert e and the sources
// s with s % blocks_per_expert == p. dynamic smem: int counts[R], first_row[R].
template <bool kUseFp8>
__global__ void __launch_bounds__(kNumThreads) dispatch_recv_kernel(Common c, DispatchRecvArgs a,
                                                                    int blocks_per_expert) {
  const Layout& l = c.layout;
  const int num_ranks = static_cast<int>(l.num_ranks);
  const int experts_per_rank = static_cast<int>(l.experts_per_rank);
  const int hidden = static_cast<int>(l.hidden);
  const int64_t rows_per_expert = l.num_ranks * l.num_max_tokens;  // R*T
  const int local_expert = blockIdx.x / blocks_per_expert;
  const int part = blockIdx.x % blocks_per_expert;
  const int tid = threadIdx.x, warp = tid / 32, lane = ptx::lane_id();
  const uint64_t epoch = *a.call_epoch;
  const int half = static_cast<int>(epoch & 1);

  EP_DYNAMIC_SHARED(int, smem);
  int* counts = smem;
  int* first_row = smem + num_ranks;
  __shared__ int total_rows;

  // 1. How many rows each source sends to this expert (every block of the expert needs all of
  //    them for the prefix).
  for (int src = tid; src < num_ranks; src += blockDim.x) {
    const uint64_t* word = l.dispatch_count(c.buffer, half, local_expert, src);
    int count = 0;
    if (wait_at_least(word, 1, c, kPhaseLowLatencyDispatchRecv, src, local_expert))
      count = static_cast<int>(ptx::ld_relaxed_sys(word) - 1);
    counts[src] = count;
  }
  __syncthreads();
  if (tid == 0) {
    int sum = 0;
    for (int src = 0; src < num_ranks; ++src) {
      first_row[src] = sum;
      sum += counts[src];
    }
    total_rows = sum;
  }
  __syncthreads();
  if (part == 0) {
    for (int src = tid; src < num_ranks; src += blockDim.x) {
      a.recv_layout[(local_expert * num_ranks + src) * 2] = first_row[src];
      a.recv_layout[(local_expert * num_ranks + src) * 2 + 1] = counts[src];
    }
    if (tid == 0) {
      a.recv_count[local_expert] = total_rows;
      // Once per dispatch (block part 0, thread 0), but atomically: two receive kernels (two
      // dispatches whose hooks run on different streams) may update the same counters at once.
      if (a.cumulative_stats != nullptr) atomicAdd(a.cumulative_stats + local_expert, total_rows);
    }
  }

  // 2. Per source: wait until all its rows landed, then copy them into place.
  __shared__ int arrived_ok;
  const int num_scales = hidden / kFp8BlockSize;
  for (int src = part; src < num_ranks; src += blocks_per_expert) {
    const int count = counts[src];
    if (count == 0) continue;
    if (tid == 0)
      arrived_ok = wait_at_least(l.dispatch_arrived(c.buffer, half, local_expert, src), static_cast<uint64_t>(count),
                                 c, kPhaseLowLatencyDispatchRecv, src, local_expert);
    __syncthreads();
    if (arrived_ok) {
      for (int i = warp; i < count; i += kNumWarps) {
        const uint8_t* message = l.dispatch_recv(c.buffer, half, local_expert, src, i);
        const int64_t row = first_row[src] + i;
        const int64_t out_row = local_expert * rows_per_expert + row;
        // Peer-written data: L2 loads (ld.global.cg), never the non-coherent path.
        const int4* from = reinterpret_cast<const int4*>(message);
        if (kUseFp8) {
          int4* to = reinterpret_cast<int4*>(static_cast<uint8_t*>(a.recv_x) + out_row * hidden);
          for (int j = lane; j < hidden / 16; j += 32) to[j] = __ldcg(from + j);
          const float* scales = reinterpret_cast<const float*>(message + hidden);
          if (a.use_ue8m0) {
            // Column-major [E_local][H/512][R*T]: word w packs scales 4w..4w+3, byte i = scale 4w+i.
            int32_t* out = static_cast<int32_t*>(a.recv_scales);
            const int num_words = num_scales / kUe8m0ScalesPerWord;
            for (int w = lane; w < num_words; w += 32) {
              const float4 s = __ldcg(reinterpret_cast<const float4*>(scales) + w);
              const uint32_t packed = ue8m0_byte(s.x) | (ue8m0_byte(s.y) << 8) | (ue8m0_byte(s.z) << 16) |
                                      (ue8m0_byte(s.w) << 24);
              out[(local_expert * num_words + w) * rows_per_expert + row] = static_cast<int32_t>(packed);
            }
          } else {
            // Column-major [E_local][H/128][R*T].
            float* out = static_cast<float*>(a.recv_scales);
            for (int j = lane; j < num_scales; j += 32)
              out[(local_expert * num_scales + j) * rows_per_expert + row] = __ldcg(scales + j);
          }
        } else {
          int4* to = reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(a.recv_x) + out_row * hidden);
          for (int j = lane; j < hidden / 8; j += 32) to[j] = __ldcg(from + j);
        }
      }
    }
    __syncthreads();  // arrived_ok is reused by the next source
  }

  // 3. The last block returns the half: zero its counters, then ack every peer.
  if (is_last_recv_block(c, half)) {
    const int num_words = experts_per_rank * num_ranks;
    uint64_t* count_words = l.dispatch_count(c.buffer, half, 0, 0);
    uint64_t* arrived_words = l.dispatch_arrived(c.buffer, half, 0, 0);
    for (int i = tid; i < num_words; i += blockDim.x) {
      ptx::st_relaxed_sys(count_words + i, static_cast<uint64_t>(0));
      ptx::st_relaxed_sys(arrived_words + i, static_cast<uint64_t>(0));
    }
    send_acks(c, half);
  }
}

// ---------------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------------

// grid: enough warps for the (local expert, source) pairs; one warp sends one pair's rows.
__global__ void __launch_bounds__(kNumThreads) combine_send_kernel(Common c, CombineSendArgs a) {
  const Layout& l = c.layout;
  const int num_ranks = static_cast<int>(l.num_ranks);
  const int experts_per_rank = static_cast<int>(l.experts_per_rank);
  const int64_t rows_per_expert = l.num_ranks * l.num_max_tokens;
  const int64_t row_bytes = l.hidden * 2;
  const int lane = ptx::lane_id();
  const int global_warp = blockIdx.x * kNumWarps + threadIdx.x / 32;
  const int num_global_warps = gridDim.x * kNumWarps;

  bool may_send = false;
  const uint64_t epoch = begin_send(c, a.call_epoch, kPhaseLowLatencyCombineSend, may_send);
  const int half = static_cast<int>(epoch & 1);
  if (!may_send) {
    end_send(c, epoch);
    return;
  }

  for (int pair = global_warp; pair < experts_per_rank * num_ranks; pair += num_global_warps) {
    const int local_expert = pair / num_ranks;
    const int src = pair % num_ranks;
    const int first_row = a.recv_layout[pair * 2];
    const int count = a.recv_layout[pair * 2 + 1];
    const int expert = c.rank * experts_per_rank + local_expert;
    if (count == 0) continue;
    uint64_t* counter = l.combine_arrived(c.buffer, half, expert);
    uint64_t* peer_counter = static_cast<uint64_t*>(p2p_address(counter, src, c.use_p2p));
    if (peer_counter != nullptr) {
      // Direct stores of all rows of the pair, one fence, one add of `count`.
      for (int i = 0; i < count; ++i) {
        const int64_t row = first_row + i;
        void* peer = p2p_address(l.combine_recv(c.buffer, half, expert, i), src, true);
        if (a.zero_copy) {
          copy_row_p2p(peer, l.combine_staging(c.buffer, local_expert, row), row_bytes, false, lane);
        } else {
          copy_row_p2p(peer, static_cast<const uint8_t*>(a.x) + (local_expert * rows_per_expert + row) * row_bytes,
                       row_bytes, true, lane);
        }
      }
      publish_p2p(lane);
      if (lane == 0) ptx::red_add_relaxed_sys(peer_counter, static_cast<uint64_t>(count));
      __syncwarp();
    } else {
      // NVSHMEM reads its source from registered memory: stage the rows unless the caller did.
      if (!a.zero_copy) {
        for (int i = 0; i < count; ++i) {
          const int64_t row = first_row + i;
          const int4* from = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(a.x) +
                                                           (local_expert * rows_per_expert + row) * row_bytes);
          int4* to = reinterpret_cast<int4*>(l.combine_staging(c.buffer, local_expert, row));
          for (int j = lane; j < row_bytes / 16; j += 32) to[j] = ptx::ld_nc_global(from + j);
        }
        publish_staging(lane);
      }
      for (int i = 0; i < count; ++i) {
        put_row_with_count(l.combine_recv(c.buffer, half, expert, i),
                           l.combine_staging(c.buffer, local_expert, first_row + i), row_bytes, counter, src);
      }
    }
  }
  end_send(c, epoch);
}

// grid: tokens (strided); block: all threads sum one token's rows, 8 channels per thread-step.
__global__ void __launch_bounds__(kNumThreads) combine_recv_kernel(Common c, CombineRecvArgs a) {
  const Layout& l = c.layout;
  const int num_experts = static_cast<int>(l.num_experts);
  const int experts_per_rank = static_cast<int>(l.experts_per_rank);
  const int hidden = static_cast<int>(l.hidden);
  const int num_topk = a.num_topk;
  const int tid = threadIdx.x;
  const uint64_t epoch = *a.call_epoch;
  const int half = static_cast<int>(epoch & 1);

  __shared__ int row_expert[kMaxTopk];   // -1: skip slot k
  __shared__ int row_slot[kMaxTopk];
  __shared__ float row_weight[kMaxTopk];

  for (int token = blockIdx.x; token < a.num_tokens; token += gridDim.x) {
    if (tid < num_topk) {
      const int64_t entry = static_cast<int64_t>(token) * num_topk + tid;
      const int64_t expert = a.topk_idx[entry];
      const int slot = a.token_slot[entry];
      bool valid = expert >= 0 && expert < num_experts && slot >= 0;
      if (valid) {
        valid = wait_at_least(l.combine_arrived(c.buffer, half, static_cast<int>(expert)),
                              static_cast<uint64_t>(a.send_count[expert]), c, kPhaseLowLatencyCombineRecv,
                              static_cast<int>(expert / experts_per_rank), expert);
      }
      row_expert[tid] = valid ? static_cast<int>(expert) : -1;
      row_slot[tid] = slot;
      row_weight[tid] = a.topk_weights[entry];
    }
    __syncthreads();
    int4* out_row = reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(a.out) + static_cast<int64_t>(token) * hidden);
    for (int chunk = tid; chunk < hidden / 8; chunk += blockDim.x) {
      float acc[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
      for (int k = 0; k < num_topk; ++k) {
        const int expert = row_expert[k];
        if (expert < 0) continue;
        const int4 raw = __ldcg(reinterpret_cast<const int4*>(l.combine_recv(c.buffer, half, expert, row_slot[k])) + chunk);
        float v[8];
        bf16x8_to_float(raw, v);
        const float w = row_weight[k];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(w, v[j]));
      }
      out_row[chunk] = float8_to_bf16x8(acc);
    }
    __syncthreads();  // row_* are reused by the next token
  }

  // The last block returns the half. It first waits for every row this rank expects, so the
  // counters are zeroed only after the last add landed even if no token waited on some expert.
  if (is_last_recv_block(c, half)) {
    for (int expert = tid; expert < num_experts; expert += blockDim.x) {
      wait_at_least(l.combine_arrived(c.buffer, half, expert), static_cast<uint64_t>(a.send_count[expert]), c,
                    kPhaseLowLatencyCombineRecv, expert / experts_per_rank, expert);
      ptx::st_relaxed_sys(l.combine_arrived(c.buffer, half, expert), static_cast<uint64_t>(0));
    }
    send_acks(c, half);
  }
}

// Completes every NVSHMEM operation this PE issued from earlier kernels. The receive kernels'
// acks are not quieted (that would add a network round trip to every receive); host-side resets
// and frees must call this first, or a late ack could land after the reset (or in freed memory).
__global__ void quiet_kernel() { nvshmem_quiet(); }

int ceil_div(int a, int b) { return (a + b - 1) / b; }

void check_common(const Common& c) {
  EP_HOST_ASSERT(c.buffer != nullptr && c.state != nullptr, "low-latency runtime is not initialised");
  EP_HOST_ASSERT(c.num_sms > 0, "num_sms must be positive");
}

constexpr size_t kMaxDynamicSmem = 48 * 1024;  // launch without opting in to more

}  // namespace

void launch_dispatch_send(const Common& c, const DispatchSendArgs& a, cudaStream_t stream) {
  check_common(c);
  EP_HOST_ASSERT(a.num_topk > 0 && a.num_topk <= kMaxTopk, "num_topk must be in [1, 32]");
  EP_HOST_ASSERT(a.num_tokens >= 0 && a.num_tokens <= c.layout.num_max_tokens,
                 "num_tokens exceeds num_max_dispatch_tokens_per_rank");
  // One warp per token at best; never more blocks than SMs.
  int num_blocks = std::max(1, std::min(c.num_sms, ceil_div(a.num_tokens, kNumWarps)));
  const int tokens_per_block = std::max(1, ceil_div(a.num_tokens, num_blocks));
  if (a.num_tokens > 0) num_blocks = ceil_div(a.num_tokens, tokens_per_block);
  const size_t smem = (2 * static_cast<size_t>(c.layout.num_experts) +
                       2 * static_cast<size_t>(tokens_per_block) * a.num_topk) * sizeof(int);
  EP_HOST_ASSERT(smem <= kMaxDynamicSmem, "low-latency dispatch needs " + std::to_string(smem) +
                                              " bytes of shared memory (num_experts too large)");
  EP_LAUNCH_KERNEL(dispatch_send_kernel, num_blocks, kNumThreads, smem, stream, c, a, tokens_per_block);
  EP_CUDA_CHECK_LAUNCH();
}

void launch_dispatch_recv(const Common& c, const DispatchRecvArgs& a, cudaStream_t stream) {
  check_common(c);
  const int experts_per_rank = static_cast<int>(c.layout.experts_per_rank);
  const int num_ranks = static_cast<int>(c.layout.num_ranks);
  const int blocks_per_expert = std::max(1, std::min(num_ranks, c.num_sms / experts_per_rank));
  const size_t smem = 2 * static_cast<size_t>(num_ranks) * sizeof(int);
  EP_HOST_ASSERT(smem <= kMaxDynamicSmem, "too many ranks for the low-latency receive kernel");
  const int num_blocks = experts_per_rank * blocks_per_expert;
  if (a.use_fp8) {
    EP_LAUNCH_KERNEL(dispatch_recv_kernel<true>, num_blocks, kNumThreads, smem, stream, c, a, blocks_per_expert);
  } else {
    EP_LAUNCH_KERNEL(dispatch_recv_kernel<false>, num_blocks, kNumThreads, smem, stream, c, a, blocks_per_expert);
  }
  EP_CUDA_CHECK_LAUNCH();
}

void launch_combine_send(const Common& c, const CombineSendArgs& a, cudaStream_t stream) {
  check_common(c);
  const int num_pairs = static_cast<int>(c.layout.experts_per_rank * c.layout.num_ranks);
  const int num_blocks = std::max(1, std::min(c.num_sms, ceil_div(num_pairs, kNumWarps)));
  EP_LAUNCH_KERNEL(combine_send_kernel, num_blocks, kNumThreads, 0, stream, c, a);
  EP_CUDA_CHECK_LAUNCH();
}

void launch_quiet(cudaStream_t stream) {
  EP_LAUNCH_KERNEL(quiet_kernel, 1, 1, 0, stream);
  EP_CUDA_CHECK_LAUNCH();
}

void launch_combine_recv(const Common& c, const CombineRecvArgs& a, cudaStream_t stream) {
  check_common(c);
  EP_HOST_ASSERT(a.num_topk > 0 && a.num_topk <= kMaxTopk, "num_topk must be in [1, 32]");
  const int num_blocks = std::max(1, std::min(c.num_sms, a.num_tokens));
  EP_LAUNCH_KERNEL(combine_recv_kernel, num_blocks, kNumThreads, 0, stream, c, a);
  EP_CUDA_CHECK_LAUNCH();
}

}  // namespace low_latency
}  // namespace ep_comm
