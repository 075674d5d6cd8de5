// The CUDA kernel language subset ep_comm's kernels use, for the emulated device: kernels compile
// as host C++ (g++ or clang) and run on CPU threads (csrc/emulator/scheduler.cpp).
//
// Execution model: every block of a launch runs at once on its own OS thread (kernels spin on
// other blocks and other ranks, as on a GPU where the whole grid is resident); the threads of a
// block are fibers on that OS thread, switched at barriers, warp collectives and "spin points"
// (acquire/relaxed/volatile loads, the global timer, nanosleep). `__shared__` variables are
// `static thread_local`: one copy per block, since a block owns its OS thread.
//
// Barriers and warp collectives check their participants: a lane missing from a collective, a
// named barrier whose thread counts disagree, or a block where no thread can move become errors
// that name the kernel, block, thread and the source line each thread waits at.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// ---- qualifiers ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __constant__
#define __align__(n) alignas(n)
#define __restrict__ __restrict

// ---- vector types ---------------------------------------------------------------------------------
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(8) float2 { float x, y; };
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace ep_comm {
namespace emu {

template <typename T>
struct same { using type = T; };
// A non-deduced parameter type: `f(T* p, same_t<T> v)` converts v like CUDA's overloads do.
template <typename T>
using same_t = typename same<T>::type;

// ---- what the scheduler provides (scheduler.cpp) --------------------------------------------------
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
int lane_id();
void* dynamic_shared_memory();

// Lets the other threads of the block run; records (what, file:line, address) as where this
// thread waits, for hang reports.
void spin_point(const volatile void* address, size_t bytes, const char* what, const char* file, int line);
long long global_timer_ns(const char* file, int line);
void nanosleep_ns(unsigned int ns, const char* file, int line);

// Barrier `id` among `num_threads` threads; id 0 with num_threads < 0 is __syncthreads (all
// threads of the block that have not exited). Returns the number of arrivals with predicate != 0.
int block_barrier(int id, int num_threads, int predicate, const char* what, const char* file, int line);
inline void named_barrier(int id, int num_threads, const char* file, int line) {
  block_barrier(id, num_threads, 0, "bar.sync", file, line);
}

enum class WarpOp : int {
  kSync, kBallot, kShflIdx, kShflUp, kShflDown, kShflXor,
  kReduceAdd, kReduceMinSigned, kReduceMinUnsigned, kReduceMaxSigned, kReduceMaxUnsigned, kMatchAny,
};
// One lane's part of a warp collective over the lanes of `mask`: `value` in, this lane's result out.
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line);

[[noreturn]] void trap(const char* what, const char* file, int line);

// ThreadSanitizer ignores standalone fences, so the "fence, then a relaxed atomic" idiom (and its
// mirror, "relaxed atomic, then a fence") orders nothing in its eyes. Under EP_EMU_TSAN the kernel
// language and ptx.cuh report fences and relaxed atomics here, and the scheduler turns them into
// the release and acquire they stand for (scheduler.cpp, "fences under TSan"). No-ops otherwise.
#ifdef EP_EMU_TSAN
void tsan_fence();
void tsan_before_store(const volatile void* address, int memory_order);  // stores and the write of an RMW
void tsan_after_load(const volatile void* address, int memory_order);    // loads and the read of an RMW
#else
inline void tsan_fence() {}
inline void tsan_before_store(const volatile void*, int) {}
inline void tsan_after_load(const volatile void*, int) {}
#endif
// A relaxed read-modify-write as the kernel language and ptx.cuh issue it (`op` does the atomic).
template <typename T, typename Op>
inline T relaxed_rmw(T* p, Op op) {
  tsan_before_store(p, __ATOMIC_RELAXED);
  const T old = op();
  tsan_after_load(p, __ATOMIC_RELAXED);
  return old;
}

// Runs `body` as every thread of every block of the grid, in stream order (runtime.cpp). A bad
// configuration sets cudaGetLastError() as CUDA's launch does; `function` keys the limits that
// cudaFuncSetAttribute raised.
using KernelBody = std::function<void()>;
void enqueue_kernel(const char* name, const void* function, dim3 grid, dim3 block, size_t shared_bytes, void* stream,
                    KernelBody body);

inline dim3 to_dim3(dim3 d) { return d; }
inline dim3 to_dim3(long long n) { return dim3(static_cast<unsigned int>(n)); }

template <typename Grid, typename Block, typename Stream, typename Body>
void launch_kernel(const char* name, const void* function, Grid grid, Block block, size_t shared_bytes, Stream stream,
                   Body&& body) {
  dim3 g, b;
  if constexpr (std::is_integral_v<Grid>) g = dim3(static_cast<unsigned int>(grid)); else g = grid;
  if constexpr (std::is_integral_v<Block>) b = dim3(static_cast<unsigned int>(block)); else b = block;
  enqueue_kernel(name, function, g, b, shared_bytes, reinterpret_cast<void*>(stream),
                 KernelBody(std::forward<Body>(body)));
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
inline T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace emu
}  // namespace ep_comm

// ---- built-in variables ------------------------------------------------------------------------------
#define threadIdx (::ep_comm::emu::thread_idx())
#define blockIdx (::ep_comm::emu::block_idx())
#define blockDim (::ep_comm::emu::block_dim())
#define gridDim (::ep_comm::emu::grid_dim())
constexpr int warpSize = 32;

// ---- barriers and warp collectives --------------------------------------------------------------------
#define EP_EMU_CALLER const char* emu_file = __builtin_FILE(), int emu_line = __builtin_LINE()

inline void __syncthreads(EP_EMU_CALLER) {
  ::ep_comm::emu::block_barrier(0, -1, 0, "__syncthreads", emu_file, emu_line);
}
inline int __syncthreads_or(int predicate, EP_EMU_CALLER) {
  return ::ep_comm::emu::block_barrier(0, -1, predicate != 0, "__syncthreads_or", emu_file, emu_line) > 0;
}
inline int __syncthreads_count(int predicate, EP_EMU_CALLER) {
  return ::ep_comm::emu::block_barrier(0, -1, predicate != 0, "__syncthreads_count", emu_file, emu_line);
}
int __syncthreads_and_impl(int predicate, const char* file, int line);
inline int __syncthreads_and(int predicate, EP_EMU_CALLER) {
  return __syncthreads_and_impl(predicate, emu_file, emu_line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, EP_EMU_CALLER) {
  ::ep_comm::emu::warp_collective(::ep_comm::emu::WarpOp::kSync, mask, 0, 0, 32, emu_file, emu_line);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, EP_EMU_CALLER) {
  return static_cast<unsigned>(::ep_comm::emu::warp_collective(::ep_comm::emu::WarpOp::kBallot, mask,
                                                                predicate != 0, 0, 32, emu_file, emu_line));
}
inline int __any_sync(unsigned mask, int predicate, EP_EMU_CALLER) {
  return __ballot_sync(mask, predicate, emu_file, emu_line) != 0;
}
inline int __all_sync(unsigned mask, int predicate, EP_EMU_CALLER) {
  return __ballot_sync(mask, predicate, emu_file, emu_line) == (mask & __ballot_sync(mask, 1, emu_file, emu_line));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32, EP_EMU_CALLER) {
  return ::ep_comm::emu::from_bits<T>(::ep_comm::emu::warp_collective(
      ::ep_comm::emu::WarpOp::kShflIdx, mask, ::ep_comm::emu::to_bits(value), src_lane, width, emu_file, emu_line));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32, EP_EMU_CALLER) {
  return ::ep_comm::emu::from_bits<T>(::ep_comm::emu::warp_collective(
      ::ep_comm::emu::WarpOp::kShflUp, mask, ::ep_comm::emu::to_bits(value), int(delta), width, emu_file, emu_line));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32, EP_EMU_CALLER) {
  return ::ep_comm::emu::from_bits<T>(::ep_comm::emu::warp_collective(
      ::ep_comm::emu::WarpOp::kShflDown, mask, ::ep_comm::emu::to_bits(value), int(delta), width, emu_file, emu_line));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32, EP_EMU_CALLER) {
  return ::ep_comm::emu::from_bits<T>(::ep_comm::emu::warp_collective(
      ::ep_comm::emu::WarpOp::kShflXor, mask, ::ep_comm::emu::to_bits(value), lane_mask, width, emu_file, emu_line));
}

// sm_80 warp reductions over the lanes of `mask` (32-bit values; add wraps as on the GPU).
#define EP_EMU_REDUCE(NAME, T, OP)                                                                     \
  inline T NAME(unsigned mask, T value, EP_EMU_CALLER) {                                               \
    return static_cast<T>(::ep_comm::emu::warp_collective(::ep_comm::emu::WarpOp::OP, mask,              \
                                                          static_cast<uint32_t>(value), 0, 32, emu_file, \
                                                          emu_line));                                    \
  }
EP_EMU_REDUCE(__reduce_add_sync, int, kReduceAdd)
EP_EMU_REDUCE(__reduce_add_sync, unsigned, kReduceAdd)
EP_EMU_REDUCE(__reduce_min_sync, int, kReduceMinSigned)
EP_EMU_REDUCE(__reduce_min_sync, unsigned, kReduceMinUnsigned)
EP_EMU_REDUCE(__reduce_max_sync, int, kReduceMaxSigned)
EP_EMU_REDUCE(__reduce_max_sync, unsigned, kReduceMaxUnsigned)
#undef EP_EMU_REDUCE
// The lanes of `mask` whose `value` equals this lane's.
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value, EP_EMU_CALLER) {
  return static_cast<unsigned>(::ep_comm::emu::warp_collective(::ep_comm::emu::WarpOp::kMatchAny, mask,
                                                               ::ep_comm::emu::to_bits(value), 0, 32, emu_file,
                                                               emu_line));
}

// ---- timers and traps ---------------------------------------------------------------------------------
inline void __nanosleep(unsigned int ns, EP_EMU_CALLER) { ::ep_comm::emu::nanosleep_ns(ns, emu_file, emu_line); }
inline long long clock64(EP_EMU_CALLER) { return ::ep_comm::emu::global_timer_ns(emu_file, emu_line); }
[[noreturn]] inline void __trap(EP_EMU_CALLER) { ::ep_comm::emu::trap("__trap()", emu_file, emu_line); }

// ---- integer intrinsics ---------------------------------------------------------------------------------
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float fabsf(float a) { return std::fabs(a); }

// ---- loads ---------------------------------------------------------------------------------------------------
template <typename T>
inline T __ldg(const T* ptr) { return *ptr; }
template <typename T>
inline T __ldcg(const T* ptr) { return *ptr; }

// ---- float arithmetic with explicit rounding (x86-64 SSE: IEEE round to nearest even, no FMA) ----------------
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

// ---- atomics (CUDA's are relaxed; _system/_block only change the scope, which is moot here) -----------------
// BODY returns the old value of *p.
#define EP_EMU_ATOMIC_SCOPES(NAME, BODY)                                                            \
  template <typename T> inline T NAME(T* p, ::ep_comm::emu::same_t<T> v) {                          \
    return ::ep_comm::emu::relaxed_rmw(p, [&] { BODY });                                             \
  }                                                                                                 \
  template <typename T> inline T NAME##_system(T* p, ::ep_comm::emu::same_t<T> v) { return NAME(p, v); } \
  template <typename T> inline T NAME##_block(T* p, ::ep_comm::emu::same_t<T> v) { return NAME(p, v); }
EP_EMU_ATOMIC_SCOPES(atomicAdd, return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);)
EP_EMU_ATOMIC_SCOPES(atomicSub, return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED);)
EP_EMU_ATOMIC_SCOPES(atomicOr, return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);)
EP_EMU_ATOMIC_SCOPES(atomicAnd, return __atomic_fetch_and(p, v, __ATOMIC_RELAXED);)
EP_EMU_ATOMIC_SCOPES(atomicExch, return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);)
EP_EMU_ATOMIC_SCOPES(atomicMax, {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return old;
})
EP_EMU_ATOMIC_SCOPES(atomicMin, {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return old;
})
#undef EP_EMU_ATOMIC_SCOPES
inline float atomicAdd(float* p, float v) {
  return ::ep_comm::emu::relaxed_rmw(p, [&] {
    float old, want;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    do {
      want = old + v;
    } while (!__atomic_compare_exchange(p, &old, &want, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
  });
}
#define EP_EMU_CAS(NAME)                                                                        \
  template <typename T>                                                                         \
  inline T NAME(T* p, ::ep_comm::emu::same_t<T> compare, ::ep_comm::emu::same_t<T> value) {    \
    return ::ep_comm::emu::relaxed_rmw(p, [&] {                                                 \
      __atomic_compare_exchange_n(p, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED); \
      return compare;                                                                           \
    });                                                                                         \
  }
EP_EMU_CAS(atomicCAS)
EP_EMU_CAS(atomicCAS_system)
EP_EMU_CAS(atomicCAS_block)
#undef EP_EMU_CAS

inline void __threadfence() {
  ::ep_comm::emu::tsan_fence();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
inline void __threadfence_system() {
  ::ep_comm::emu::tsan_fence();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
inline void __threadfence_block() {
  ::ep_comm::emu::tsan_fence();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
