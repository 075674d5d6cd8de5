// Correct programs: each case checks its own results against a host reference and prints a
// RESULT digest that must be the same under every fiber schedule (EP_COMM_EMU_SCHEDULE).
#include <algorithm>
#include <climits>
#include <cstdint>

#include "harness.hpp"

namespace ptx = ep_comm::ptx;

namespace {

// FNV-1a over raw bytes: the schedule-independent digest of a case's outputs.
struct Digest {
  uint64_t h = 1469598103934665603ull;
  template <typename T>
  void add(const std::vector<T>& v) {
    const auto* p = reinterpret_cast<const unsigned char*>(v.data());
    for (size_t i = 0; i < v.size() * sizeof(T); ++i) h = (h ^ p[i]) * 1099511628211ull;
  }
  void print(const char* what) const { std::printf("RESULT %s %016llx\n", what, static_cast<unsigned long long>(h)); }
};

// Every block arrives, then waits until `target` arrivals (a grid barrier over atomics).
__device__ void grid_sync(int* arrive, int target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    ptx::atomic_add_release_sys(arrive, 1);
    while (ptx::ld_acquire_sys(arrive) < target) {
    }
  }
  __syncthreads();
}

// ---- one block waits on a flag another releases -------------------------------------------------

__global__ void handoff_kernel(int producer, int* flag, int* data, int* out, int n) {
  const int tid = threadIdx.x;
  if (static_cast<int>(blockIdx.x) == producer) {
    for (int i = tid; i < n; i += blockDim.x) data[i] = i * 7 + 3;
    __syncthreads();
    if (tid == 0) ptx::st_release_sys(flag, 1);
  } else {
    if (tid == 0)
      while (ptx::ld_acquire_sys(flag) != 1) {
      }
    __syncthreads();
    for (int i = tid; i < n; i += blockDim.x) out[i] = data[i] * 2;
  }
}

// Blocks 0 and 1 take turns: each waits for the other's round before its own.
__global__ void ping_pong_kernel(int* ping, int* pong, int rounds, int* log) {
  if (threadIdx.x == 0) {
    for (int r = 1; r <= rounds; ++r) {
      if (blockIdx.x == 0) {
        ptx::st_release_sys(ping, r);
        while (ptx::ld_acquire_sys(pong) != r) {
        }
        log[2 * (r - 1)] = r;
      } else {
        while (ptx::ld_acquire_sys(ping) != r) {
        }
        log[2 * (r - 1) + 1] = -r;
        ptx::st_release_sys(pong, r);
      }
    }
  }
  __syncthreads();
}

EMU_CASE(cross_block_spin) {
  constexpr int n = 1000;
  Digest digest;
  for (int producer = 0; producer < 2; ++producer) {
    int* flag = emu_test::device_alloc<int>(1);
    int* data = emu_test::device_alloc<int>(n);
    int* out = emu_test::device_alloc<int>(n);
    CUDA_OK(cudaMemset(flag, 0, sizeof(int)));
    EP_LAUNCH_KERNEL(handoff_kernel, 2, 64, 0, emu_test::kDefaultStream, producer, flag, data, out, n);
    CUDA_OK(cudaGetLastError());
    CUDA_OK(cudaDeviceSynchronize());
    const auto got = to_host(out, n);
    for (int i = 0; i < n; ++i) CHECK(got[i] == (i * 7 + 3) * 2, "producer %d: out[%d] = %d", producer, i, got[i]);
    digest.add(got);
    CUDA_OK(cudaFree(flag));
    CUDA_OK(cudaFree(data));
    CUDA_OK(cudaFree(out));
  }
  constexpr int rounds = 50;
  int* ping = emu_test::device_alloc<int>(1);
  int* pong = emu_test::device_alloc<int>(1);
  int* log = emu_test::device_alloc<int>(2 * rounds);
  CUDA_OK(cudaMemset(ping, 0, sizeof(int)));
  CUDA_OK(cudaMemset(pong, 0, sizeof(int)));
  EP_LAUNCH_KERNEL(ping_pong_kernel, 2, 32, 0, emu_test::kDefaultStream, ping, pong, rounds, log);
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = to_host(log, 2 * rounds);
  for (int r = 1; r <= rounds; ++r) {
    CHECK(got[2 * (r - 1)] == r && got[2 * (r - 1) + 1] == -r, "ping-pong round %d", r);
  }
  digest.add(got);
  digest.print("cross_block_spin");
  return 0;
}

// ---- many blocks waiting on one another -------------------------------------------------------------

__global__ void grid_barrier_kernel(int* arrive, int* values, unsigned long long* sums, int rounds) {
  const int nb = gridDim.x, b = blockIdx.x;
  for (int r = 0; r < rounds; ++r) {
    if (threadIdx.x == 0) values[r * nb + b] = (b + 1) * (r + 1);
    grid_sync(arrive, (r + 1) * nb);
    // Every block reads every block's value of this round: a block let through early sees garbage.
    unsigned long long s = 0;
    for (int i = threadIdx.x; i < nb; i += blockDim.x) s += static_cast<unsigned long long>(values[r * nb + i]);
    atomicAdd(&sums[r * nb + b], s);
  }
}

EMU_CASE(grid_barrier) {
  const int nb = argc > 1 ? std::atoi(argv[1]) : 96;
  constexpr int rounds = 3;
  int* arrive = emu_test::device_alloc<int>(1);
  int* values = emu_test::device_alloc<int>(nb * rounds);  // left as cudaMalloc's garbage
  auto* sums = emu_test::device_alloc<unsigned long long>(nb * rounds);
  CUDA_OK(cudaMemset(arrive, 0, sizeof(int)));
  CUDA_OK(cudaMemset(sums, 0, nb * rounds * sizeof(unsigned long long)));
  EP_LAUNCH_KERNEL(grid_barrier_kernel, nb, 64, 0, emu_test::kDefaultStream, arrive, values, sums, rounds);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = to_host(sums, nb * rounds);
  for (int r = 0; r < rounds; ++r)
    for (int b = 0; b < nb; ++b) {
      const unsigned long long want = 1ull * (r + 1) * nb * (nb + 1) / 2;
      CHECK(got[r * nb + b] == want, "round %d block %d summed %llu, want %llu", r, b, got[r * nb + b], want);
    }
  const auto arrivals = to_host(arrive, 1);
  CHECK(arrivals[0] == rounds * nb, "%d arrivals", arrivals[0]);
  Digest digest;
  digest.add(got);
  digest.print("grid_barrier");
  std::printf("blocks %d\n", nb);
  return 0;
}

// ---- __syncthreads_count / _or / _and, 3-D blocks, threads that exit early ----------------------------

constexpr int kReduceOut = 12;

__global__ void syncthreads_reduce_kernel(int* out) {
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int num_threads = blockDim.x * blockDim.y * blockDim.z;
  int* o = out + (blockIdx.x * num_threads + tid) * kReduceOut;
  o[10] = threadIdx.x | (threadIdx.y << 8) | (threadIdx.z << 16);
  o[11] = num_threads;
  o[0] = __syncthreads_count(tid % 3 == 0);
  o[1] = __syncthreads_or(tid == 77);
  o[2] = __syncthreads_or(0);
  o[3] = __syncthreads_and(1);
  o[4] = __syncthreads_and(tid != 100);
  o[5] = __syncthreads_count(blockIdx.x == 1 && tid < 50);
  if (tid >= 100) return;  // the rest go on without them
  o[6] = __syncthreads_count(1);
  o[7] = __syncthreads_and(tid < 100);
  o[8] = __syncthreads_or(tid == 99);
  o[9] = __syncthreads_count(tid % 2);
}

EMU_CASE(syncthreads_reduce) {
  constexpr int blocks = 2, threads = 128;
  int* out = emu_test::device_alloc<int>(blocks * threads * kReduceOut);
  CUDA_OK(cudaMemset(out, 0xff, blocks * threads * kReduceOut * sizeof(int)));
  EP_LAUNCH_KERNEL(syncthreads_reduce_kernel, blocks, dim3(16, 4, 2), 0, emu_test::kDefaultStream, out);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = to_host(out, blocks * threads * kReduceOut);
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) {
      const int* o = &got[(b * threads + t) * kReduceOut];
      const int want[kReduceOut] = {43, 1, 0, 1, 0, b == 1 ? 50 : 0,
                                    t < 100 ? 100 : -1, t < 100 ? 1 : -1, t < 100 ? 1 : -1, t < 100 ? 50 : -1,
                                    (t % 16) | ((t / 16 % 4) << 8) | ((t / 64) << 16), threads};
      for (int k = 0; k < kReduceOut; ++k)
        CHECK(o[k] == want[k], "block %d thread %d result %d: got %d, want %d", b, t, k, o[k], want[k]);
    }
  Digest digest;
  digest.add(got);
  digest.print("syncthreads_reduce");
  return 0;
}

// ---- warp collectives over full warps ---------------------------------------------------------------------

constexpr int kWarpOut = 19;

__device__ int warp_value(int block, int tid) { return 1000 * block + 10 * tid + 1; }

__global__ void warp_collectives_kernel(long long* out) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  long long* o = out + (blockIdx.x * blockDim.x + tid) * kWarpOut;
  const int v = warp_value(blockIdx.x, tid);
  o[0] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  o[1] = __any_sync(0xffffffffu, lane == 29 - warp);
  o[2] = __all_sync(0xffffffffu, lane != 40);
  o[3] = __all_sync(0xffffffffu, lane != 13);
  o[4] = lane % 2 == 0 ? static_cast<long long>(__ballot_sync(0x55555555u, lane % 4 == 0)) : -1;
  o[5] = __shfl_sync(0xffffffffu, v, 5);
  o[6] = __shfl_sync(0xffffffffu, v, 3, 8);
  o[7] = __shfl_sync(0xffffffffu, v, 11, 8);
  o[8] = __shfl_up_sync(0xffffffffu, v, 3, 16);
  o[9] = __shfl_down_sync(0xffffffffu, v, 2, 8);
  o[10] = __shfl_xor_sync(0xffffffffu, v, 5);
  o[11] = ptx::warp_reduce_sum(v);
  int segment_sum = v;
  for (int m = 1; m < 16; m <<= 1) segment_sum += __shfl_xor_sync(0xffffffffu, segment_sum, m, 16);
  o[12] = segment_sum;
  const long long wide = (static_cast<long long>(v) << 33) | lane;
  o[13] = __shfl_sync(0xffffffffu, wide, 31 - lane);
  const double half = v * 0.5;
  o[14] = static_cast<long long>(__shfl_down_sync(0xffffffffu, half, 16) * 2);
  o[15] = __shfl_up_sync(0xffffffffu, v, 1);
  o[16] = ptx::lane_id();
  o[17] = ptx::elect_one() ? 1 : 0;
  // A lane mask reaching past the group of 8: earlier groups may be read, later ones give one's own.
  o[18] = __shfl_xor_sync(0xffffffffu, v, 8, 8);
}

long long host_warp_value(int block, int tid) { return 1000 * block + 10 * tid + 1; }

EMU_CASE(warp_collectives) {
  constexpr int blocks = 2, threads = 64;
  auto* out = emu_test::device_alloc<long long>(blocks * threads * kWarpOut);
  EP_LAUNCH_KERNEL(warp_collectives_kernel, blocks, threads, 0, emu_test::kDefaultStream, out);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = to_host(out, blocks * threads * kWarpOut);
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) {
      const int lane = t % 32, base = t - lane;
      auto v = [&](int l) { return host_warp_value(b, base + l); };
      long long ballot3 = 0, warp_sum = 0, segment_sum = 0;
      for (int l = 0; l < 32; ++l) {
        if (l % 3 == 0) ballot3 |= 1ll << l;
        warp_sum += v(l);
        if (l / 16 == lane / 16) segment_sum += v(l);
      }
      const long long want[kWarpOut] = {
          ballot3,
          1,
          1,
          0,
          lane % 2 == 0 ? 0x11111111ll : -1,
          v(5),
          v(lane / 8 * 8 + 3),
          v(lane / 8 * 8 + 3),
          lane % 16 >= 3 ? v(lane - 3) : v(lane),
          lane % 8 < 6 ? v(lane + 2) : v(lane),
          v(lane ^ 5),
          warp_sum,
          segment_sum,
          (v(31 - lane) << 33) | (31 - lane),
          lane < 16 ? v(lane + 16) : v(lane),
          lane >= 1 ? v(lane - 1) : v(lane),
          lane,
          lane == 0 ? 1 : 0,
          (lane ^ 8) >= lane / 8 * 8 + 8 ? v(lane) : v(lane ^ 8),
      };
      for (int k = 0; k < kWarpOut; ++k) {
        const long long g = got[(b * threads + t) * kWarpOut + k];
        CHECK(g == want[k], "block %d thread %d result %d: got %lld, want %lld", b, t, k, g, want[k]);
      }
    }
  Digest digest;
  digest.add(got);
  digest.print("warp_collectives");
  return 0;
}

// ---- warp reductions (__reduce_*_sync): signed and unsigned, full and partial masks -----------------------

constexpr int kWarpReduceOut = 6;
__device__ int reduce_value(int tid) { return (tid * 37) % 101 - 50; }  // negatives too

__global__ void warp_reductions_kernel(long long* out) {
  const int tid = threadIdx.x, lane = tid % 32;
  long long* o = out + tid * kWarpReduceOut;
  const int v = reduce_value(tid);
  o[0] = __reduce_add_sync(0xffffffffu, v);
  o[1] = __reduce_min_sync(0xffffffffu, v);
  o[2] = __reduce_min_sync(0xffffffffu, static_cast<unsigned>(v));
  o[3] = __reduce_max_sync(0xffffffffu, v);
  o[4] = __reduce_max_sync(0xffffffffu, static_cast<unsigned>(v));
  o[5] = lane % 2 == 0 ? __reduce_min_sync(0x55555555u, v) : 0;
}

EMU_CASE(warp_reductions) {
  constexpr int threads = 64;
  auto* out = emu_test::device_alloc<long long>(threads * kWarpReduceOut);
  EP_LAUNCH_KERNEL(warp_reductions_kernel, 1, threads, 0, emu_test::kDefaultStream, out);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = to_host(out, threads * kWarpReduceOut);
  auto host_value = [](int tid) { return (tid * 37) % 101 - 50; };
  for (int t = 0; t < threads; ++t) {
    const int lane = t % 32, base = t - lane;
    long long sum = 0;
    int smin = INT32_MAX, smax = INT32_MIN, even_min = INT32_MAX;
    unsigned umin = UINT32_MAX, umax = 0;
    for (int l = 0; l < 32; ++l) {
      const int v = host_value(base + l);
      sum += v;
      smin = std::min(smin, v);
      smax = std::max(smax, v);
      umin = std::min(umin, static_cast<unsigned>(v));
      umax = std::max(umax, static_cast<unsigned>(v));
      if (l % 2 == 0) even_min = std::min(even_min, v);
    }
    const long long want[kWarpReduceOut] = {static_cast<int>(sum), smin, umin, smax, umax, lane % 2 == 0 ? even_min : 0};
    for (int k = 0; k < kWarpReduceOut; ++k) {
      const long long g = got[t * kWarpReduceOut + k];
      CHECK(g == want[k], "thread %d result %d: got %lld, want %lld", t, k, g, want[k]);
    }
  }
  Digest digest;
  digest.add(got);
  digest.print("warp_reductions");
  return 0;
}

// ---- partial-mask warp collectives: disjoint halves, odd lanes, nested groups -------------------------------

constexpr int kPartialOut = 6;

__global__ void syncwarp_partial_kernel(int* out) {
  __shared__ int s_data[64];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  int* s = s_data + warp * 32;
  int* o = out + (blockIdx.x * blockDim.x + tid) * kPartialOut;
  // Each half of the warp exchanges through shared memory, synchronising only itself.
  if (lane < 16) {
    s[lane] = 100 + lane + 1000 * warp;
    __syncwarp(0x0000ffffu);
    o[0] = s[15 - lane];
  } else {
    s[lane] = 200 + lane + 1000 * warp;
    __syncwarp(0xffff0000u);
    o[0] = s[47 - lane];
  }
  __syncwarp();
  // Shuffles of the two halves, different in each, in divergent branches.
  if (lane < 16)
    o[1] = __shfl_xor_sync(0x0000ffffu, lane * 3, 1);
  else
    o[1] = __shfl_down_sync(0xffff0000u, lane * 3, 1, 16);
  // A ballot of the odd lanes only.
  o[2] = (lane & 1) ? static_cast<int>(__ballot_sync(0xaaaaaaaau, lane > 20)) : 0;
  __syncwarp();
  // Nested groups: lanes 0-3, then lanes 0-7, then the whole warp.
  if (lane < 4) {
    s[lane] = 1000 + lane;
    __syncwarp(0x0000000fu);
    o[3] = s[3 - lane];
    __syncwarp(0x0000000fu);
  }
  if (lane < 8) {
    __syncwarp(0x000000ffu);
    s[lane] = 2000 + lane;
    __syncwarp(0x000000ffu);
    o[4] = s[7 - lane];
  }
  __syncwarp();
  o[5] = __shfl_sync(0xffffffffu, lane + 100 * warp, 31 - lane);
}

EMU_CASE(syncwarp_partial) {
  constexpr int blocks = 2, threads = 64;
  int* out = emu_test::device_alloc<int>(blocks * threads * kPartialOut);
  CUDA_OK(cudaMemset(out, 0xff, blocks * threads * kPartialOut * sizeof(int)));
  EP_LAUNCH_KERNEL(syncwarp_partial_kernel, blocks, threads, 0, emu_test::kDefaultStream, out);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = to_host(out, blocks * threads * kPartialOut);
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) {
      const int lane = t % 32, warp = t / 32;
      const int want[kPartialOut] = {
          lane < 16 ? 100 + (15 - lane) + 1000 * warp : 200 + (47 - lane) + 1000 * warp,
          lane < 16 ? (lane ^ 1) * 3 : (lane < 31 ? (lane + 1) * 3 : lane * 3),
          (lane & 1) ? static_cast<int>(0xaaaaaaaau & 0xffe00000u) : 0,
          lane < 4 ? 1000 + 3 - lane : -1,
          lane < 8 ? 2000 + 7 - lane : -1,
          31 - lane + 100 * warp,
      };
      for (int k = 0; k < kPartialOut; ++k) {
        const int g = got[(b * threads + t) * kPartialOut + k];
        CHECK(g == want[k], "block %d thread %d result %d: got %d, want %d", b, t, k, g, want[k]);
      }
    }
  Digest digest;
  digest.add(got);
  digest.print("syncwarp_partial");
  return 0;
}

// ---- named barriers among subsets of warps ------------------------------------------------------------------

__global__ void named_barrier_kernel(int* out, int* flag_seen, int iterations) {
  __shared__ int s_slot[2][32];
  __shared__ int s_flag;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (tid == 0) s_flag = 0;
  __syncthreads();
  // Warps 0 and 1 hand rows over through barrier 1, warps 2 and 3 through barrier 2.
  const int pair = warp / 2;
  const bool producer = warp % 2 == 0;
  for (int it = 0; it < iterations; ++it) {
    if (producer) s_slot[pair][lane] = it * 1000 + pair * 100 + lane;
    ptx::named_barrier(1 + pair, 64);
    if (!producer) out[(blockIdx.x * iterations + it) * 64 + pair * 32 + lane] = s_slot[pair][lane];
    ptx::named_barrier(1 + pair, 64);
  }
  // Warps 1-3 meet at barrier 3 (96 threads) while warp 0 polls a flag warp 3 sets after it.
  if (warp == 0) {
    int seen;
    while ((seen = ptx::ld_volatile_i32(&s_flag)) == 0) {
    }
    flag_seen[blockIdx.x * 32 + lane] = seen;
  } else {
    ptx::named_barrier(3, 96);
    if (warp == 3 && lane == 0) ptx::st_release_sys(&s_flag, 7 + static_cast<int>(blockIdx.x));
  }
}

EMU_CASE(named_barriers) {
  constexpr int blocks = 2, iterations = 10;
  int* out = emu_test::device_alloc<int>(blocks * iterations * 64);
  int* flag_seen = emu_test::device_alloc<int>(blocks * 32);
  EP_LAUNCH_KERNEL(named_barrier_kernel, blocks, 128, 0, emu_test::kDefaultStream, out, flag_seen, iterations);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  const auto got = to_host(out, blocks * iterations * 64);
  for (int b = 0; b < blocks; ++b)
    for (int it = 0; it < iterations; ++it)
      for (int i = 0; i < 64; ++i) {
        const int want = it * 1000 + (i / 32) * 100 + i % 32;
        const int g = got[(b * iterations + it) * 64 + i];
        CHECK(g == want, "block %d iteration %d slot %d: got %d, want %d", b, it, i, g, want);
      }
  const auto seen = to_host(flag_seen, blocks * 32);
  for (int i = 0; i < blocks * 32; ++i) CHECK(seen[i] == 7 + i / 32, "warp 0 lane %d saw flag %d", i % 32, seen[i]);
  Digest digest;
  digest.add(got);
  digest.add(seen);
  digest.print("named_barriers");
  return 0;
}

// ---- dynamic and static shared memory: per block, above 48 KiB with the attribute ----------------------------

__global__ void shared_memory_kernel(int* arrive, int num_dynamic, int* errors, unsigned long long* addresses) {
  EP_DYNAMIC_SHARED(int, s_dynamic);
  __shared__ int s_static[1024];
  const int b = blockIdx.x, tid = threadIdx.x;
  for (int i = tid; i < num_dynamic; i += blockDim.x) s_dynamic[i] = b * 1000003 + i;
  for (int i = tid; i < 1024; i += blockDim.x) s_static[i] = -(b * 7919 + i);
  // Every block has written its copy before any block reads its own back.
  grid_sync(arrive, gridDim.x);
  int bad = 0;
  for (int i = tid; i < num_dynamic; i += blockDim.x) {
    const int j = num_dynamic - 1 - i;  // written by another thread
    bad += s_dynamic[j] != b * 1000003 + j;
  }
  for (int i = tid; i < 1024; i += blockDim.x) {
    const int j = 1023 - i;
    bad += s_static[j] != -(b * 7919 + j);
  }
  if (bad != 0) atomicAdd(&errors[b], bad);
  if (tid == 0) {
    addresses[2 * b] = reinterpret_cast<uintptr_t>(s_dynamic);
    addresses[2 * b + 1] = reinterpret_cast<uintptr_t>(s_static);
  }
}

EMU_CASE(shared_memory) {
  constexpr int blocks = 4, shared_bytes = 100 * 1024, num_dynamic = shared_bytes / 4;
  int* arrive = emu_test::device_alloc<int>(1);
  int* errors = emu_test::device_alloc<int>(blocks);
  auto* addresses = emu_test::device_alloc<unsigned long long>(2 * blocks);
  CUDA_OK(cudaMemset(arrive, 0, sizeof(int)));
  CUDA_OK(cudaMemset(errors, 0, blocks * sizeof(int)));
  CUDA_OK(cudaFuncSetAttribute(shared_memory_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
  EP_LAUNCH_KERNEL(shared_memory_kernel, blocks, 256, shared_bytes, emu_test::kDefaultStream, arrive, num_dynamic,
                   errors, addresses);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  const auto bad = to_host(errors, blocks);
  for (int b = 0; b < blocks; ++b) CHECK(bad[b] == 0, "block %d read %d foreign or lost shared values", b, bad[b]);
  const auto where = to_host(addresses, 2 * blocks);
  for (int b = 0; b < blocks; ++b) {
    CHECK(where[2 * b] % 16 == 0, "block %d: dynamic shared memory at %llx is not 16-byte aligned", b, where[2 * b]);
    for (int c = 0; c < b; ++c) {
      CHECK(where[2 * b] != where[2 * c], "blocks %d and %d share dynamic shared memory", b, c);
      CHECK(where[2 * b + 1] != where[2 * c + 1], "blocks %d and %d share static shared memory", b, c);
    }
  }
  Digest digest;
  digest.add(bad);
  digest.print("shared_memory");
  return 0;
}

// ---- 3-D grids and blocks -------------------------------------------------------------------------------------

__global__ void indexing_kernel(int* hits, int* coords, int* dims) {
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int g = block * (blockDim.x * blockDim.y * blockDim.z) + tid;
  atomicAdd(&hits[g], 1);
  coords[g] = blockIdx.x | (blockIdx.y << 4) | (blockIdx.z << 8) | (threadIdx.x << 12) | (threadIdx.y << 16) |
              (threadIdx.z << 20);
  if (g == 0) {
    dims[0] = gridDim.x, dims[1] = gridDim.y, dims[2] = gridDim.z;
    dims[3] = blockDim.x, dims[4] = blockDim.y, dims[5] = blockDim.z;
  }
}

EMU_CASE(indexing) {
  const dim3 grid(3, 2, 2), block(8, 4, 2);
  constexpr int total = 12 * 64;
  int* hits = emu_test::device_alloc<int>(total);
  int* coords = emu_test::device_alloc<int>(total);
  int* dims = emu_test::device_alloc<int>(6);
  CUDA_OK(cudaMemset(hits, 0, total * sizeof(int)));
  EP_LAUNCH_KERNEL(indexing_kernel, grid, block, 0, emu_test::kDefaultStream, hits, coords, dims);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  const auto h = to_host(hits, total);
  const auto c = to_host(coords, total);
  const auto d = to_host(dims, 6);
  CHECK(d[0] == 3 && d[1] == 2 && d[2] == 2 && d[3] == 8 && d[4] == 4 && d[5] == 2, "gridDim/blockDim");
  for (int g = 0; g < total; ++g) {
    const int b = g / 64, t = g % 64;
    const int want = (b % 3) | ((b / 3 % 2) << 4) | ((b / 6) << 8) | ((t % 8) << 12) | ((t / 8 % 4) << 16) |
                     ((t / 32) << 20);
    CHECK(h[g] == 1 && c[g] == want, "thread %d: %d hits, coords %x, want %x", g, h[g], c[g], want);
  }
  Digest digest;
  digest.add(c);
  digest.print("indexing");
  return 0;
}

// ---- the fiber schedule itself: the order threads first run, and after a barrier -------------------------------

__global__ void schedule_probe_kernel(int* counters, int* first, int* second) {
  first[atomicAdd(&counters[0], 1)] = threadIdx.x;  // before any switch
  __syncthreads();
  second[atomicAdd(&counters[1], 1)] = threadIdx.x;
}

EMU_CASE(schedule_probe) {
  constexpr int threads = 64;
  int* counters = emu_test::device_alloc<int>(2);
  int* first = emu_test::device_alloc<int>(threads);
  int* second = emu_test::device_alloc<int>(threads);
  CUDA_OK(cudaMemset(counters, 0, 2 * sizeof(int)));
  EP_LAUNCH_KERNEL(schedule_probe_kernel, 1, threads, 0, emu_test::kDefaultStream, counters, first, second);
  CUDA_OK(cudaDeviceSynchronize());
  for (const int* order : {first, second}) {
    const auto got = to_host(order, threads);
    std::printf("ORDER");
    for (int t : got) std::printf(" %d", t);
    std::printf("\n");
  }
  return 0;
}

}  // namespace
