// Device helpers of the intranode kernels: the kernel-start rendezvous, the epoch bookkeeping,
// bounded waits on tagged counters, and the 16-byte moves. Names carry their memory semantics.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/common/intranode_layout.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/timeout.cuh"
#include "kernels/intranode.hpp"

namespace ep_comm {
namespace intranode {

// ---------------------------------------------------------------------------------------------
// Memory access helpers not in ptx.cuh
// ---------------------------------------------------------------------------------------------

// Loads of ring slots: the slot is rewritten by a peer between rounds (and between kernels), so it
// must not come from L1 (not coherent with remote writes) nor from the read-only path. `.cg`
// caches in L2 only, which is where the peer's NVLink stores land.
__device__ __forceinline__ int4 ld_cg_v4(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}
__device__ __forceinline__ int ld_cg(const int* ptr) {
  int v;
  asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(ptr));
  return v;
}
__device__ __forceinline__ float ld_cg(const float* ptr) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(ptr));
  return v;
}

// Barrier among `num_threads` threads (a multiple of 32) of the block using barrier `id`
// (1..15; 0 is __syncthreads). Orders their memory accesses like __syncthreads does.
__device__ __forceinline__ void named_barrier(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

template <typename T>
__device__ __forceinline__ T* at(void* base, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

// ---------------------------------------------------------------------------------------------
// Bounded waits
// ---------------------------------------------------------------------------------------------

// How often a spinning thread also looks at the (host-mapped, slow to read) error slot, so that
// once one thread of this rank gave up the others stop too instead of each waiting a full timeout.
constexpr int kErrorPollInterval = 4096;

// Spins until the tagged word at `word` (in this rank's buffer) carries `epoch` and a value
// >= `target`. Returns the value, or -1 after a timeout (reported) or another thread's error.
__device__ __forceinline__ int64_t wait_tagged_at_least(const uint64_t* word, uint64_t epoch,
                                                        uint32_t target, const Context& ctx,
                                                        int phase, int peer) {
  const long long start = global_timer_ns();
  for (int iter = 1;; ++iter) {
    const uint64_t value = ptx::ld_acquire_sys(reinterpret_cast<const unsigned long long*>(word));
    if (tag_matches(value, epoch) && uint32_t(value) >= target) return int64_t(uint32_t(value));
    if (spin_timed_out(start, ctx.timeout_ns)) {
      report_timeout(ctx.error_slot, ctx.rank, phase, peer, target);
      return -1;
    }
    if (iter % kErrorPollInterval == 0 && error_reported(ctx.error_slot)) return -1;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel start and end
// ---------------------------------------------------------------------------------------------
//
// Every intranode kernel is one epoch. Its number lives in device memory (this rank's buffer), not
// in a kernel argument, so a CUDA graph replaying the kernel still advances it. The epoch counts
// this rank's communication kernels; every rank launches the same sequence, so the numbers agree.

// The epoch of the kernel now starting (all blocks read the same value: it only changes when the
// last block of the kernel finishes).
__device__ __forceinline__ uint64_t read_epoch(const Context& ctx, const BufferLayout& layout) {
  __shared__ uint64_t s_epoch;
  if (threadIdx.x == 0)
    s_epoch = ptx::ld_relaxed_gpu(at<unsigned long long>(ctx.buffers[ctx.rank], layout.epoch_offset())) + 1;
  __syncthreads();
  return s_epoch;
}

// Rendezvous of this block with the kernel of the same epoch on every peer. Publishing
// started[me] = epoch tells peers that all of this rank's earlier kernels have finished (stream
// order), so nobody reads or writes what they use in a peer's buffer any more; waiting until every
// peer published the epoch tells the same about them. After it, a block may freely write into peer
// buffers: what it writes can only be consumed by this epoch's kernels. Returns false (in every
// thread) after a timeout.
__device__ __forceinline__ bool start_rendezvous(const Context& ctx, const BufferLayout& layout,
                                                 uint64_t epoch) {
  bool failed = false;
  if (threadIdx.x < ctx.num_ranks) {
    const int peer = threadIdx.x;
    ptx::st_release_sys(at<unsigned long long>(ctx.buffers[peer], layout.started_offset(ctx.rank)),
                        static_cast<unsigned long long>(epoch));
    const auto* started = at<unsigned long long>(ctx.buffers[ctx.rank], layout.started_offset(peer));
    const long long start = global_timer_ns();
    for (int iter = 1; ptx::ld_acquire_sys(started) < epoch; ++iter) {
      if (spin_timed_out(start, ctx.timeout_ns)) {
        report_timeout(ctx.error_slot, ctx.rank, kPhaseBarrier, peer, static_cast<long long>(epoch));
        failed = true;
        break;
      }
      if (iter % kErrorPollInterval == 0 && error_reported(ctx.error_slot)) {
        failed = true;
        break;
      }
    }
  }
  // An error recorded by an earlier kernel of this rank (sticky: the host raises it at its next
  // call, but kernels queued before that still run) means the buffer is out of step: e.g. notify
  // found a peer with another ring layout, or more rows than num_worst_tokens (then combine would
  // read x past its rows). Do nothing then; peers time out and report. Checked by a thread that
  // does not spin above, so the (slow) host-mapped read overlaps the wait.
  if (threadIdx.x == blockDim.x - 1 && threadIdx.x >= ctx.num_ranks && error_reported(ctx.error_slot))
    failed = true;
  return !__syncthreads_or(failed);
}

// The last block to finish advances the epoch for the next kernel. acq_rel on the counter orders
// every block's read_epoch() before the update.
__device__ __forceinline__ void finish_epoch(const Context& ctx, const BufferLayout& layout,
                                             uint64_t epoch) {
  __syncthreads();
  if (threadIdx.x == 0) {
    auto* finished = at<unsigned int>(ctx.buffers[ctx.rank], layout.finished_blocks_offset());
    const unsigned int before = ptx::atomic_add_acq_rel_gpu(finished, 1u);
    if (before == gridDim.x - 1) {
      ptx::st_relaxed_gpu(finished, 0u);
      ptx::st_release_gpu(at<unsigned long long>(ctx.buffers[ctx.rank], layout.epoch_offset()),
                          static_cast<unsigned long long>(epoch));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row moves (one warp per row)
// ---------------------------------------------------------------------------------------------

constexpr int kCopyUnroll = 4;  // independent 16-byte loads in flight per lane before storing

// Input tensor -> ring slot (possibly in a peer's memory).
__device__ __forceinline__ void warp_copy_to_ring(int4* dst, const int4* src, int num_vectors, int lane) {
  for (int base = lane; base < num_vectors; base += 32 * kCopyUnroll) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (base + u * 32 < num_vectors) v[u] = ptx::ld_nc_global(src + base + u * 32);
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (base + u * 32 < num_vectors) ptx::st_na_global(dst + base + u * 32, v[u]);
  }
}

// Ring slot (this rank's memory, written by a peer) -> output tensor.
__device__ __forceinline__ void warp_copy_from_ring(int4* dst, const int4* src, int num_vectors, int lane) {
  for (int base = lane; base < num_vectors; base += 32 * kCopyUnroll) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (base + u * 32 < num_vectors) v[u] = ld_cg_v4(src + base + u * 32);
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (base + u * 32 < num_vectors) ptx::st_na_global(dst + base + u * 32, v[u]);
  }
}

__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
  const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
  int4 v;
  auto* pairs = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  return v;
}

// Exclusive prefix sum over the block of one int per thread; also returns the block total.
// `scratch` holds one int per warp. Every thread must call it.
template <int kNumThreads>
__device__ __forceinline__ int block_exclusive_sum(int value, int* scratch, int& total) {
  constexpr int kNumWarps = kNumThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  int warp_base = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) {
    const int s = scratch[w];
    if (w < warp) warp_base += s;
    sum += s;
  }
  __syncthreads();  // scratch may be reused right after
  total = sum;
  return warp_base + inclusive - value;
}

}  // namespace intranode
}  // namespace ep_comm
