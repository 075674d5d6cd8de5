// Device helpers of the intranode kernels: the kernel-start rendezvous, the epoch bookkeeping,
// bounded waits on tagged counters, and the 16-byte moves. Names carry their memory semantics.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#include "kernels/common/intranode_layout.cuh"
#include "kernels/common/ptx.cuh"
#include "kernels/common/timeout.cuh"
#include "kernels/intranode.hpp"

namespace ep_comm {
namespace intranode {

// ---------------------------------------------------------------------------------------------
// Addressing
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T* at(void* base, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

// ---------------------------------------------------------------------------------------------
// Bounded waits
// ---------------------------------------------------------------------------------------------

// Tells every rank (this one too) that this rank's kernel of `epoch` failed, with the error it
// just recorded in its error slot: the abort word of this epoch, unless another rank's failure in
// the same call is already there (the first stays). The fields are read back from the slot's
// record (this thread wrote them), not passed in, so the compiler cannot compute the word ahead
// in every kernel and hold it in a register for the whole kernel (dispatch spilled a register
// when it did).
__device__ __forceinline__ void broadcast_abort(const Context& ctx, uint64_t epoch) {
  const ErrorSlot* recorded = ctx.error_slot->record;
  const unsigned long long news = make_tagged(
      epoch, pack_abort(ptx::ld_relaxed_sys(&recorded->rank), ptx::ld_relaxed_sys(&recorded->code),
                        ptx::ld_relaxed_sys(&recorded->phase), ptx::ld_relaxed_sys(&recorded->peer)));
  for (int r = 0; r < ctx.num_ranks; ++r) {
    auto* word = at<unsigned long long>(ctx.buffers[r], BufferLayout::abort_offset(epoch));
    unsigned long long seen = ptx::ld_relaxed_sys(word);
    while (!tag_matches(seen, epoch)) {
      const unsigned long long before = atomicCAS_system(word, seen, news);
      if (before == seen) break;
      seen = before;
    }
  }
}

// Records an error in the error slot (first one wins). The first error of this rank also
// sets its sticky device flag, tagged with this epoch, which the next kernel publishes to its
// peers in place of its signature; and a timeout is broadcast to every rank's abort word, so
// peers waiting in this same call stop at once instead of each waiting out its own timeout (a
// mismatch needs no broadcast: every rank sees it in its own rendezvous).
__device__ __forceinline__ void report_failure(const Context& ctx, uint64_t epoch, int code, int phase, int peer,
                                               long long detail) {
  if (!report_error(ctx.error_slot, code, ctx.rank, phase, peer, detail)) return;
  ptx::st_relaxed_gpu(at<unsigned long long>(ctx.buffers[ctx.rank], BufferLayout::failed_offset()),
                      static_cast<unsigned long long>(make_tagged(epoch, 1u)));
  if (code == kErrorTimeout) broadcast_abort(ctx, epoch);
}

// Whether a rank's kernel of this epoch broadcast an abort; if so, records that this rank stopped
// waiting in `phase` because of it (naming that rank), and returns true.
__device__ __forceinline__ bool abort_received(const Context& ctx, uint64_t epoch, int phase) {
  const uint64_t word = ptx::ld_relaxed_sys(at<const unsigned long long>(ctx.buffers[ctx.rank], BufferLayout::abort_offset(epoch)));
  if (!tag_matches(word, epoch)) return false;
  report_failure(ctx, epoch, kErrorPeerAborted, phase, unpack_abort(uint32_t(word)).rank,
                 static_cast<long long>(uint32_t(word)));
  return true;
}

// How often a spinning thread also looks at the error slot (its claim word, in device memory), so
// that once one thread of this rank gave up the others stop too instead of each waiting a full
// timeout.
constexpr int kErrorPollInterval = 4096;
// How often it looks at its abort word (device memory, cheap): from the first miss on.
constexpr int kAbortPollInterval = 32;

// Spins until the tagged word at `word` (in this rank's buffer) carries `epoch` and a value
// >= `target`. Returns the value, or -1 after a timeout (reported), an abort broadcast by a rank
// that failed in this call (reported), or another thread's error.
__device__ __forceinline__ int64_t wait_tagged_at_least(const uint64_t* word, uint64_t epoch,
                                                        uint32_t target, const Context& ctx,
                                                        int phase, int peer) {
  const long long start = global_timer_ns();
  for (int iter = 1;; ++iter) {
    const uint64_t value = ptx::ld_acquire_sys(reinterpret_cast<const unsigned long long*>(word));
    if (tag_matches(value, epoch) && uint32_t(value) >= target) return int64_t(uint32_t(value));
    if (spin_timed_out(start, ctx.timeout_ns)) {
      report_failure(ctx, epoch, kErrorTimeout, phase, peer, target);
      return -1;
    }
    if (iter % kAbortPollInterval == 1 && abort_received(ctx, epoch, phase)) return -1;
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
// last block of the kernel finishes), and whether an earlier kernel of this rank failed (the
// sticky device flag; read in the same breath, so it costs no extra latency). A flag tagged with
// this epoch was set a moment ago by a sibling block of this very kernel: not "failed before".
__device__ __forceinline__ uint64_t read_epoch(const Context& ctx, const BufferLayout& layout, bool& failed_before) {
  __shared__ uint64_t s_epoch;
  __shared__ unsigned int s_failed;
  if (threadIdx.x == 0) {
    s_epoch = ptx::ld_relaxed_gpu(at<unsigned long long>(ctx.buffers[ctx.rank], layout.epoch_offset())) + 1;
    const uint64_t failed = ptx::ld_relaxed_gpu(at<unsigned long long>(ctx.buffers[ctx.rank], BufferLayout::failed_offset()));
    s_failed = failed != 0 && !tag_matches(failed, s_epoch);
  }
  __syncthreads();
  failed_before = s_failed != 0;
  return s_epoch;
}

// Rendezvous of this block with the kernel of the same epoch on every peer. Publishing
// started[epoch parity][me] = (epoch, signature) tells peers that all of this rank's earlier
// kernels have finished (stream order), so nobody reads or writes what they use in a peer's buffer
// any more; waiting until every peer published the epoch tells the same about them. After it, a
// block may freely write into peer buffers: what it writes can only be consumed by this epoch's
// kernels.
//
// The signature (see kSignatureLimit) makes every kernel check that all ranks launched the same
// kind of call with the same ring layout: on a mismatch both sides report an invalid-input error
// naming the peer and skip the work, before any ring is touched. A rank whose earlier kernel
// failed publishes kSignaturePeerFailed, so its peers skip too instead of timing out on it (the
// host launches a kernel before raising a recorded error, see bindings/intranode.cpp, so the
// kernel after the failing one does carry the news). Healthy ranks are at most one kernel apart
// (a rank's next rendezvous needs every peer's word of that next epoch), so the slot of this
// epoch's parity holds this epoch's word until it is read; only a failed rank, which stops
// waiting once its error slot is set, can run further ahead, and its later words all say
// "failed". A late block of a kernel that failed in its rendezvous (a sibling block saw a
// mismatch) reads a flag tagged with this epoch, so it publishes its signature like the others,
// and every peer reports the mismatch itself. A peer's abort of this epoch (a timeout somewhere,
// e.g. a third rank that never came) ends the wait too, naming that peer.
// Returns false (in every thread) if the work must be skipped.
__device__ __forceinline__ bool start_rendezvous(const Context& ctx, const BufferLayout& layout, uint64_t epoch,
                                                 uint32_t signature, bool failed_before) {
  bool failed = failed_before;
  if (threadIdx.x < ctx.num_ranks) {
    const int peer = threadIdx.x;
    const uint32_t published = failed_before ? kSignaturePeerFailed : signature;
    ptx::st_release_sys(at<unsigned long long>(ctx.buffers[peer], layout.started_offset(epoch, ctx.rank)),
                        static_cast<unsigned long long>(make_tagged(epoch, published)));
    const auto* started = at<unsigned long long>(ctx.buffers[ctx.rank], layout.started_offset(epoch, peer));
    const long long start = global_timer_ns();
    bool arrived = false;
    uint64_t word = 0;
    for (int iter = 1;; ++iter) {
      word = ptx::ld_acquire_sys(started);
      // A failed peer leaves its rendezvous early (its error poll) and may run ahead, writing
      // this parity slot again with a later epoch: a "failed" word of a later epoch counts too.
      if (tag_matches(word, epoch) ||
          (uint32_t(word) == kSignaturePeerFailed && int32_t(uint32_t(word >> 32) - uint32_t(epoch)) > 0)) {
        arrived = true;
        break;
      }
      if (spin_timed_out(start, ctx.timeout_ns)) {
        report_failure(ctx, epoch, kErrorTimeout, kPhaseBarrier, peer, static_cast<long long>(epoch));
        break;
      }
      if (iter % kAbortPollInterval == 1 && abort_received(ctx, epoch, kPhaseBarrier)) break;
      if (iter % kErrorPollInterval == 0 && error_reported(ctx.error_slot)) break;
    }
    if (!arrived) {
      failed = true;
    } else if (!failed_before && uint32_t(word) != signature) {
      // detail: this rank's signature in the high half, the peer's in the low half.
      report_failure(ctx, epoch, kErrorInvalidInput, kPhaseBarrier, peer,
                     static_cast<long long>((uint64_t(signature) << 32) | (word & 0xffffffffull)));
      failed = true;
    }
  }
  // An error recorded by an earlier kernel of this rank (sticky: the host raises it at its next
  // call, but kernels queued before that still run) means the buffer is out of step: e.g. more
  // rows than num_worst_tokens (then combine would read x past its rows). The device flag above
  // covers errors of intranode kernels; this read of the error slot (by a thread that does not
  // spin above, so it overlaps the wait) is a second line of defence. Peers were told through the
  // published signature when the flag was set; otherwise they time out and report.
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
      if (base + u * 32 < num_vectors) v[u] = ptx::ld_cg_v4(src + base + u * 32);
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u)
      if (base + u * 32 < num_vectors) ptx::st_na_global(dst + base + u * 32, v[u]);
  }
}

// Bit casts through memcpy: reading an int4 through a __nv_bfloat162* breaks strict aliasing, and
// g++ -O2 then silently dropped the combine bias on the emulated device. nvcc turns these copies
// into register moves.
__device__ __forceinline__ void add_bf16x8(float (&acc)[8], const int4& v) {
  __nv_bfloat162 pairs[4];
  memcpy(pairs, &v, sizeof(pairs));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    acc[2 * i] += f.x;
    acc[2 * i + 1] += f.y;
  }
}

__device__ __forceinline__ int4 pack_bf16x8(const float (&acc)[8]) {
  __nv_bfloat162 pairs[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  int4 v;
  memcpy(&v, pairs, sizeof(v));
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
