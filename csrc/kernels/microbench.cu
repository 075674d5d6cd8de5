// Interconnect microbenchmarks: SM-store copies (peer memory through CUDA IPC) and NVSHMEM put /
// put-with-signal bandwidth and ping-pong latency. Interface and protocol: microbench.hpp.
// Deliberately small: each kernel is the loop it measures and nothing else.
#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/common/ptx.cuh"
#include "kernels/common/timeout.cuh"
#include "kernels/microbench.hpp"
#include "runtime/errors.hpp"

namespace ep_comm {
namespace microbench {

namespace {

constexpr int kCopyUnroll = 4;                    // 16-byte loads in flight per thread before its stores
constexpr int64_t kMinPutBytesPerBlock = 32 << 10;  // default split: no block puts less than this
constexpr int kSpinsPerTimerCheck = 64;

// ---------------------------------------------------------------------------------------------
// SM-store copy
// ---------------------------------------------------------------------------------------------

// Grid-stride copy. Vector part: 16-byte chunks [0, num_vectors), each thread loads kCopyUnroll
// chunks (stride apart) before storing them, so several loads are in flight. Thread t handles
// chunks t, t + stride, t + 2*stride, ...: every chunk exactly once. Tail: the bytes from
// num_vectors*16 (all of them when the pointers are not both 16-byte aligned), one per thread.
__global__ void __launch_bounds__(kNumThreads) sm_copy_kernel(uint8_t* dst, const uint8_t* src, size_t num_bytes,
                                                              bool vectorised) {
  const size_t thread = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t num_vectors = vectorised ? num_bytes / 16 : 0;
  const int4* src4 = reinterpret_cast<const int4*>(src);
  int4* dst4 = reinterpret_cast<int4*>(dst);

  for (size_t base = thread; base < num_vectors; base += stride * kCopyUnroll) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const size_t i = base + u * stride;
      if (i < num_vectors) v[u] = ptx::ld_nc_global(src4 + i);
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const size_t i = base + u * stride;
      if (i < num_vectors) ptx::st_na_global(dst4 + i, v[u]);
    }
  }
  for (size_t i = num_vectors * 16 + thread; i < num_bytes; i += stride) dst[i] = src[i];
}

// ---------------------------------------------------------------------------------------------
// NVSHMEM put bandwidth
// ---------------------------------------------------------------------------------------------

// Block b owns bytes [b * bytes_per_block, min(num_bytes, (b + 1) * bytes_per_block)); the host
// sizes the grid so that no block is empty, and every thread of a block makes the same
// block-scoped calls (NVSHMEM's requirement). One quiet per block at the end: quiet completes
// everything this PE issued, and it is what a real producer pays before reusing its source.
__global__ void __launch_bounds__(kNumThreads) put_bench_kernel(uint8_t* dst, const uint8_t* src, size_t num_bytes,
                                                                size_t bytes_per_block, int dst_pe, int iters,
                                                                uint64_t* signal) {
  const size_t begin = std::min(num_bytes, static_cast<size_t>(blockIdx.x) * bytes_per_block);
  const size_t end = std::min(num_bytes, begin + bytes_per_block);
  if (begin < end) {
    for (int i = 0; i < iters; ++i) {
      if (signal != nullptr)
        nvshmemx_putmem_signal_nbi_block(dst + begin, src + begin, end - begin, signal, 1, NVSHMEM_SIGNAL_ADD, dst_pe);
      else
        nvshmemx_putmem_nbi_block(dst + begin, src + begin, end - begin, dst_pe);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();
}

// ---------------------------------------------------------------------------------------------
// NVSHMEM ping-pong latency (one thread per PE)
// ---------------------------------------------------------------------------------------------

// Waits until the local signal word reaches `target`; false after timeout_ns. The bounded spin
// replaces nvshmem_signal_wait_until (which cannot give up); once the value is there, the real
// wait_until returns at once and lets the transport make the message that came with it visible.
__device__ __forceinline__ bool wait_signal_at_least(uint64_t* signal, uint64_t target, long long timeout_ns) {
  const long long start = global_timer_ns();
  for (int spins = 0; nvshmem_signal_fetch(signal) < target; ++spins) {
    if (spins % kSpinsPerTimerCheck == kSpinsPerTimerCheck - 1 && spin_timed_out(start, timeout_ns)) return false;
  }
  nvshmem_signal_wait_until(signal, NVSHMEM_CMP_GE, target);
  return true;
}

// The message to `peer` (same symmetric offsets there), then +1 on its signal word once the data
// has landed (put-with-signal ordering, any transport).
__device__ __forceinline__ void send(uint8_t* msg, size_t num_bytes, uint64_t* signal, int peer) {
  nvshmem_putmem_signal_nbi(msg, msg, num_bytes, signal, 1, NVSHMEM_SIGNAL_ADD, peer);
}

// Zero this PE's own signal word for the next call, and order that before any later send: the
// peer's next add must land on the zero, not before it.
__device__ __forceinline__ void reset_signal(uint64_t* signal) {
  ptx::st_relaxed_sys(signal, static_cast<uint64_t>(0));
  __threadfence_system();
}

// Launched <<<1, 1>>> on both PEs. Round r = 1..iters + 1 (round 1 untimed, see microbench.hpp).
__global__ void pingpong_kernel(uint8_t* msg, size_t num_bytes, uint64_t* signal, int peer, bool initiator, int iters,
                                long long timeout_ns, PingPongResult* result) {
  const int num_rounds = iters + 1;
  long long start_ns = global_timer_ns();
  int rounds_done = 0;
  bool timed_out = false;
  for (int r = 1; r <= num_rounds; ++r) {
    if (r == 2) start_ns = global_timer_ns();
    const bool last = r == num_rounds;
    if (initiator) {
      send(msg, num_bytes, signal, peer);
      if (!wait_signal_at_least(signal, static_cast<uint64_t>(r), timeout_ns)) { timed_out = true; break; }
      if (last) reset_signal(signal);  // nothing more comes to it in this call
    } else {
      if (!wait_signal_at_least(signal, static_cast<uint64_t>(r), timeout_ns)) { timed_out = true; break; }
      if (last) reset_signal(signal);  // before the answer, after which the initiator may start its next call
      send(msg, num_bytes, signal, peer);
    }
    rounds_done = r;
  }
  const long long end_ns = global_timer_ns();
  nvshmem_quiet();
  result->elapsed_ns = end_ns - start_ns;
  result->rounds_done = rounds_done;
  result->timed_out = timed_out ? 1 : 0;
}

__global__ void quiet_kernel() { nvshmem_quiet(); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int num_sms_of_current_device() {
  int device = -1, num_sms = 0;
  EP_CUDA_CHECK(cudaGetDevice(&device));
  EP_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  return num_sms;
}

}  // namespace

void launch_sm_copy(void* dst, const void* src, int64_t num_bytes, int num_blocks, cudaStream_t stream) {
  EP_HOST_ASSERT(num_bytes >= 0, "sm_copy: num_bytes must be >= 0, got " + std::to_string(num_bytes));
  EP_HOST_ASSERT(num_bytes == 0 || (dst != nullptr && src != nullptr), "sm_copy: null pointer");
  const int max_blocks = num_blocks > 0 ? num_blocks : num_sms_of_current_device();
  if (num_bytes == 0) return;
  const bool vectorised = ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16) == 0;
  const int64_t work_items = vectorised ? std::max<int64_t>(num_bytes / 16, 1) : num_bytes;
  const int blocks = static_cast<int>(std::min<int64_t>(max_blocks, ceil_div(work_items, kNumThreads)));
  sm_copy_kernel<<<blocks, kNumThreads, 0, stream>>>(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src),
                                                      static_cast<size_t>(num_bytes), vectorised);
  EP_CUDA_CHECK_LAUNCH();
}

void launch_put_bench(uint8_t* dst, const uint8_t* src, int64_t num_bytes, int dst_pe, int iters, uint64_t* signal,
                      int num_blocks, cudaStream_t stream) {
  EP_HOST_ASSERT(num_bytes > 0, "nvshmem put_bench: num_bytes must be positive, got " + std::to_string(num_bytes));
  EP_HOST_ASSERT(iters > 0, "nvshmem put_bench: iters must be positive, got " + std::to_string(iters));
  EP_HOST_ASSERT(dst != nullptr && src != nullptr, "nvshmem put_bench: null pointer");
  const int64_t max_blocks = num_blocks > 0 ? num_blocks
                                            : std::min<int64_t>(num_sms_of_current_device(),
                                                                ceil_div(num_bytes, kMinPutBytesPerBlock));
  // 16-byte aligned shares, then only as many blocks as there are non-empty shares.
  const int64_t bytes_per_block = ceil_div(ceil_div(num_bytes, max_blocks), 16) * 16;
  const int blocks = static_cast<int>(ceil_div(num_bytes, bytes_per_block));
  put_bench_kernel<<<blocks, kNumThreads, 0, stream>>>(dst, src, static_cast<size_t>(num_bytes),
                                                        static_cast<size_t>(bytes_per_block), dst_pe, iters, signal);
  EP_CUDA_CHECK_LAUNCH();
}

PingPongResult run_pingpong(uint8_t* msg, int64_t num_bytes, uint64_t* signal, int peer, bool initiator, int iters,
                            long long timeout_ns, cudaStream_t stream) {
  EP_HOST_ASSERT(num_bytes > 0, "nvshmem pingpong: num_bytes must be positive, got " + std::to_string(num_bytes));
  EP_HOST_ASSERT(iters > 0, "nvshmem pingpong: iters must be positive, got " + std::to_string(iters));
  EP_HOST_ASSERT(msg != nullptr && signal != nullptr, "nvshmem pingpong: null pointer");
  EP_HOST_ASSERT(timeout_ns > 0, "nvshmem pingpong: timeout must be positive");
  PingPongResult* device_result = nullptr;
  EP_CUDA_CHECK(cudaMalloc(&device_result, sizeof(PingPongResult)));
  PingPongResult result{};
  try {
    pingpong_kernel<<<1, 1, 0, stream>>>(msg, static_cast<size_t>(num_bytes), signal, peer, initiator, iters,
                                         timeout_ns, device_result);
    EP_CUDA_CHECK_LAUNCH();
    EP_CUDA_CHECK(cudaMemcpyAsync(&result, device_result, sizeof(result), cudaMemcpyDeviceToHost, stream));
    EP_CUDA_CHECK(cudaStreamSynchronize(stream));
  } catch (...) {
    cudaFree(device_result);
    throw;
  }
  EP_CUDA_CHECK(cudaFree(device_result));
  return result;
}

void launch_quiet(cudaStream_t stream) {
  quiet_kernel<<<1, 1, 0, stream>>>();
  EP_CUDA_CHECK_LAUNCH();
}

}  // namespace microbench
}  // namespace ep_comm
