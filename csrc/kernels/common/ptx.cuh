// Device helpers whose names carry their memory ordering and scope, so a kernel reads as its
// protocol: `st_release_sys(flag, 1)` publishes everything written before it to every agent
// (peer GPUs and the host); `ld_acquire_sys(flag)` makes what the publisher wrote visible.
//
//   scope  .gpu: threads of this GPU          .sys: peer GPUs (NVLink/IPC) and the host
//   order  relaxed: atomic, no ordering       acquire/release: one-way barriers around it
//
// On the GPU all are `asm volatile` with a "memory" clobber, so the compiler neither drops nor
// moves other memory accesses across them. Targets sm_70+ (written for sm_90).
//
// This is the only file with inline PTX, and the only kernel header with a branch for the emulated
// device (csrc/emulator, EP_COMM_EMULATOR): there every primitive maps to a C++ atomic of the same
// ordering, and every load that a kernel may spin on is a "spin point" where the emulator lets the
// other threads of the block run (a CPU thread per block, a fiber per CUDA thread).
#pragma once

#include <cstdint>

#ifdef EP_COMM_EMULATOR
#include "ep_emu/device.hpp"
#endif

namespace ep_comm {
namespace ptx {

#ifdef EP_COMM_EMULATOR
// ---------------------------------------------------------------------------------------
// Emulated device: the same names over C++ atomics. Scopes (.gpu/.sys/.cta) all become
// process-wide, which is what shared memory between rank processes gives anyway. Loads are spin
// points (the emulator switches to another thread of the block there and records where each
// thread waits, for its deadlock reports). The file/line defaults name the caller.
// ---------------------------------------------------------------------------------------
// tsan_*: what ThreadSanitizer must be told about fences and relaxed atomics (ep_emu/device.hpp).
#define EP_EMU_LOAD(NAME, ORDER)                                                                    \
  template <typename T>                                                                             \
  inline T NAME(const T* ptr, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {  \
    ::ep_comm::emu::spin_point(ptr, sizeof(T), #NAME, file, line);                                  \
    const T value = __atomic_load_n(ptr, ORDER);                                                    \
    ::ep_comm::emu::tsan_after_load(ptr, ORDER);                                                    \
    return value;                                                                                   \
  }
#define EP_EMU_STORE(NAME, ORDER)                                \
  template <typename T>                                          \
  inline void NAME(T* ptr, ::ep_comm::emu::same_t<T> value) {    \
    ::ep_comm::emu::tsan_before_store(ptr, ORDER);               \
    __atomic_store_n(ptr, value, ORDER);                         \
  }
#define EP_EMU_ADD(NAME, ORDER)                                  \
  template <typename T>                                          \
  inline T NAME(T* ptr, ::ep_comm::emu::same_t<T> value) {       \
    ::ep_comm::emu::tsan_before_store(ptr, ORDER);               \
    const T old = __atomic_fetch_add(ptr, value, ORDER);         \
    ::ep_comm::emu::tsan_after_load(ptr, ORDER);                 \
    return old;                                                  \
  }
#define EP_EMU_RED(NAME, ORDER)                                  \
  template <typename T>                                          \
  inline void NAME(T* ptr, ::ep_comm::emu::same_t<T> value) {    \
    ::ep_comm::emu::tsan_before_store(ptr, ORDER);               \
    __atomic_fetch_add(ptr, value, ORDER);                       \
  }

EP_EMU_LOAD(ld_acquire_sys, __ATOMIC_ACQUIRE)
EP_EMU_LOAD(ld_acquire_gpu, __ATOMIC_ACQUIRE)
EP_EMU_LOAD(ld_relaxed_sys, __ATOMIC_RELAXED)
EP_EMU_LOAD(ld_relaxed_gpu, __ATOMIC_RELAXED)
EP_EMU_STORE(st_release_sys, __ATOMIC_RELEASE)
EP_EMU_STORE(st_release_gpu, __ATOMIC_RELEASE)
EP_EMU_STORE(st_relaxed_sys, __ATOMIC_RELAXED)
EP_EMU_STORE(st_relaxed_gpu, __ATOMIC_RELAXED)
EP_EMU_ADD(atomic_add_release_sys, __ATOMIC_RELEASE)
EP_EMU_ADD(atomic_add_release_gpu, __ATOMIC_RELEASE)
EP_EMU_ADD(atomic_add_relaxed_sys, __ATOMIC_RELAXED)
EP_EMU_ADD(atomic_add_relaxed_gpu, __ATOMIC_RELAXED)
EP_EMU_ADD(atomic_add_acq_rel_sys, __ATOMIC_ACQ_REL)
EP_EMU_ADD(atomic_add_acq_rel_gpu, __ATOMIC_ACQ_REL)
EP_EMU_RED(red_add_release_sys, __ATOMIC_RELEASE)
EP_EMU_RED(red_add_release_gpu, __ATOMIC_RELEASE)
EP_EMU_RED(red_add_relaxed_sys, __ATOMIC_RELAXED)
EP_EMU_RED(red_add_relaxed_gpu, __ATOMIC_RELAXED)
#undef EP_EMU_LOAD
#undef EP_EMU_STORE
#undef EP_EMU_ADD
#undef EP_EMU_RED

#define EP_EMU_FENCE(NAME, ORDER)      \
  inline void NAME() {                 \
    ::ep_comm::emu::tsan_fence();      \
    __atomic_thread_fence(ORDER);      \
  }
EP_EMU_FENCE(fence_acq_rel_sys, __ATOMIC_ACQ_REL)
EP_EMU_FENCE(fence_acq_rel_gpu, __ATOMIC_ACQ_REL)
EP_EMU_FENCE(fence_acq_rel_cta, __ATOMIC_ACQ_REL)
EP_EMU_FENCE(fence_sc_sys, __ATOMIC_SEQ_CST)
EP_EMU_FENCE(fence_sc_gpu, __ATOMIC_SEQ_CST)
#undef EP_EMU_FENCE

// Payload moves are plain accesses: ThreadSanitizer checks them against the protocol's
// acquire/release pairs, which is how a ring published before its payload shows up.
inline int4 ld_nc_global(const int4* ptr) { return *ptr; }
inline void st_na_global(int4* ptr, const int4& v) { *ptr = v; }
inline int4 ld_cg_v4(const int4* ptr) { return *ptr; }
inline int ld_cg(const int* ptr) { return *ptr; }
inline float ld_cg(const float* ptr) { return *ptr; }
// Volatile loads are spin points too (kernels poll ring payload and counters with them).
inline int4 ld_volatile_v4(const void* ptr, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::ep_comm::emu::spin_point(ptr, 16, "ld_volatile_v4", file, line);
  const int* p = static_cast<const int*>(ptr);  // four relaxed words: a poll, not a data race
  return int4{__atomic_load_n(p, __ATOMIC_RELAXED), __atomic_load_n(p + 1, __ATOMIC_RELAXED),
              __atomic_load_n(p + 2, __ATOMIC_RELAXED), __atomic_load_n(p + 3, __ATOMIC_RELAXED)};
}
inline int ld_volatile_i32(const void* ptr, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::ep_comm::emu::spin_point(ptr, 4, "ld_volatile_i32", file, line);
  return __atomic_load_n(static_cast<const int*>(ptr), __ATOMIC_RELAXED);
}
inline float ld_volatile_f32(const void* ptr, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::ep_comm::emu::spin_point(ptr, 4, "ld_volatile_f32", file, line);
  float value;
  __atomic_load(static_cast<const float*>(ptr), &value, __ATOMIC_RELAXED);
  return value;
}

inline void named_barrier(int id, int num_threads, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::ep_comm::emu::named_barrier(id, num_threads, file, line);
}
inline long long global_timer_ns(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::ep_comm::emu::global_timer_ns(file, line);
}
inline int lane_id() { return ::ep_comm::emu::lane_id(); }

#else  // CUDA

// ---------------------------------------------------------------------------------------
// Scalar loads, stores and atomics on global memory, for 32- and 64-bit integers
// ---------------------------------------------------------------------------------------

// Generates ld_<order>_<scope>, st_<order>_<scope>, atomic_add_<order>_<scope> (returns
// the old value) and red_add_<order>_<scope> (no return: cheaper for counters).
#define EP_PTX_LOAD(NAME, QUAL, T, PTX_T, REG)                                    \
  __device__ __forceinline__ T NAME(const T* ptr) {                               \
    T value;                                                                      \
    asm volatile("ld." QUAL ".global." PTX_T " %0, [%1];"                         \
                 : "=" REG(value)                                                 \
                 : "l"(ptr)                                                       \
                 : "memory");                                                     \
    return value;                                                                 \
  }
#define EP_PTX_STORE(NAME, QUAL, T, PTX_T, REG)                                   \
  __device__ __forceinline__ void NAME(T* ptr, T value) {                         \
    asm volatile("st." QUAL ".global." PTX_T " [%0], %1;" ::"l"(ptr), REG(value)  \
                 : "memory");                                                     \
  }
#define EP_PTX_ATOMIC_ADD(NAME, QUAL, T, PTX_T, REG)                              \
  __device__ __forceinline__ T NAME(T* ptr, T value) {                            \
    T old;                                                                        \
    asm volatile("atom." QUAL ".global.add." PTX_T " %0, [%1], %2;"               \
                 : "=" REG(old)                                                   \
                 : "l"(ptr), REG(value)                                           \
                 : "memory");                                                     \
    return old;                                                                   \
  }
#define EP_PTX_RED_ADD(NAME, QUAL, T, PTX_T, REG)                                 \
  __device__ __forceinline__ void NAME(T* ptr, T value) {                         \
    asm volatile("red." QUAL ".global.add." PTX_T " [%0], %1;" ::"l"(ptr), REG(value) \
                 : "memory");                                                     \
  }

// ld/st use the signed or bit type; atom/red.add has .s32, .u32 and .u64 (no .s64: two's
// complement makes .u64 correct for int64_t too).
#define EP_PTX_ALL_ORDERS(T, LDST_T, ADD_T, REG)                                      \
  EP_PTX_LOAD(ld_acquire_sys, "acquire.sys", T, LDST_T, REG)                          \
  EP_PTX_LOAD(ld_acquire_gpu, "acquire.gpu", T, LDST_T, REG)                          \
  EP_PTX_LOAD(ld_relaxed_sys, "relaxed.sys", T, LDST_T, REG)                          \
  EP_PTX_LOAD(ld_relaxed_gpu, "relaxed.gpu", T, LDST_T, REG)                          \
  EP_PTX_STORE(st_release_sys, "release.sys", T, LDST_T, REG)                         \
  EP_PTX_STORE(st_release_gpu, "release.gpu", T, LDST_T, REG)                         \
  EP_PTX_STORE(st_relaxed_sys, "relaxed.sys", T, LDST_T, REG)                         \
  EP_PTX_STORE(st_relaxed_gpu, "relaxed.gpu", T, LDST_T, REG)                         \
  EP_PTX_ATOMIC_ADD(atomic_add_release_sys, "release.sys", T, ADD_T, REG)             \
  EP_PTX_ATOMIC_ADD(atomic_add_release_gpu, "release.gpu", T, ADD_T, REG)             \
  EP_PTX_ATOMIC_ADD(atomic_add_relaxed_sys, "relaxed.sys", T, ADD_T, REG)             \
  EP_PTX_ATOMIC_ADD(atomic_add_relaxed_gpu, "relaxed.gpu", T, ADD_T, REG)             \
  EP_PTX_ATOMIC_ADD(atomic_add_acq_rel_sys, "acq_rel.sys", T, ADD_T, REG)             \
  EP_PTX_ATOMIC_ADD(atomic_add_acq_rel_gpu, "acq_rel.gpu", T, ADD_T, REG)             \
  EP_PTX_RED_ADD(red_add_release_sys, "release.sys", T, ADD_T, REG)                   \
  EP_PTX_RED_ADD(red_add_release_gpu, "release.gpu", T, ADD_T, REG)                   \
  EP_PTX_RED_ADD(red_add_relaxed_sys, "relaxed.sys", T, ADD_T, REG)                   \
  EP_PTX_RED_ADD(red_add_relaxed_gpu, "relaxed.gpu", T, ADD_T, REG)

EP_PTX_ALL_ORDERS(int, "s32", "s32", "r")
EP_PTX_ALL_ORDERS(unsigned int, "u32", "u32", "r")
EP_PTX_ALL_ORDERS(long long, "s64", "u64", "l")
EP_PTX_ALL_ORDERS(unsigned long long, "u64", "u64", "l")
// int64_t/uint64_t are `long`/`unsigned long` on LP64 Linux: distinct from long long.
EP_PTX_ALL_ORDERS(long, "s64", "u64", "l")
EP_PTX_ALL_ORDERS(unsigned long, "u64", "u64", "l")

#undef EP_PTX_ALL_ORDERS
#undef EP_PTX_LOAD
#undef EP_PTX_STORE
#undef EP_PTX_ATOMIC_ADD
#undef EP_PTX_RED_ADD

// ---------------------------------------------------------------------------------------
// Fences
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }
__device__ __forceinline__ void fence_acq_rel_cta() { asm volatile("fence.acq_rel.cta;" ::: "memory"); }
// Sequentially consistent: orders stores before later loads too (Dekker-style handshakes).
__device__ __forceinline__ void fence_sc_sys() { asm volatile("fence.sc.sys;" ::: "memory"); }
__device__ __forceinline__ void fence_sc_gpu() { asm volatile("fence.sc.gpu;" ::: "memory"); }

// ---------------------------------------------------------------------------------------
// 16-byte payload moves
// ---------------------------------------------------------------------------------------

// Non-coherent load through the read-only path, not kept in L1. Only for data that nothing
// writes while the kernel runs (the caller's input tensors), never for queues or flags.
__device__ __forceinline__ int4 ld_nc_global(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// Store that does not allocate in L1: for streaming payload to a peer or output buffer.
__device__ __forceinline__ void st_na_global(int4* ptr, const int4& v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x),
               "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// Loads of ring slots a peer rewrites between rounds (and between kernels): not from L1 (not
// coherent with remote writes) nor the read-only path. `.cg` caches in L2 only, where the peer's
// NVLink stores land.
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

// Loads of payload that peers (or the NIC) wrote and that a kernel polls: volatile, so no stale
// L1 line is used.
__device__ __forceinline__ int4 ld_volatile_v4(const void* ptr) {
  int4 v;
  asm volatile("ld.volatile.global.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr)
               : "memory");
  return v;
}
__device__ __forceinline__ int ld_volatile_i32(const void* ptr) {
  int v;
  asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}
__device__ __forceinline__ float ld_volatile_f32(const void* ptr) {
  float v;
  asm volatile("ld.volatile.global.f32 %0, [%1];" : "=f"(v) : "l"(ptr) : "memory");
  return v;
}

// ---------------------------------------------------------------------------------------
// Block barriers, lane id, global timer
// ---------------------------------------------------------------------------------------

// Barrier among `num_threads` threads (a multiple of 32) of the block using barrier `id`
// (1..15; 0 is __syncthreads). Orders their memory accesses like __syncthreads does.
__device__ __forceinline__ void named_barrier(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

__device__ __forceinline__ int lane_id() {
  int lane;
  asm volatile("mov.s32 %0, %%laneid;" : "=r"(lane));
  return lane;
}

// Nanoseconds from the GPU's global timer, one clock for the whole device. Not clock64(): ranks
// sharing a GPU without MPS are time-sliced, and a preempted block may resume on another SM whose
// cycle counter is unrelated, which would fake or hide a timeout.
__device__ __forceinline__ long long global_timer_ns() {
  unsigned long long ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return static_cast<long long>(ns);
}

#endif  // EP_COMM_EMULATOR

// ---------------------------------------------------------------------------------------
// Warp helpers
// ---------------------------------------------------------------------------------------

// True in exactly one lane of `mask` (all lanes of `mask` must call it together).
__device__ __forceinline__ bool elect_one(unsigned mask = 0xffffffffu) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned elected = 0;
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  elect.sync _|p, %1;\n"
      "  selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(elected)
      : "r"(mask));
  return elected != 0;
#else
  return lane_id() == __ffs(mask) - 1;
#endif
}

// Butterfly reductions: every lane of the full warp gets the result.
__device__ __forceinline__ float warp_reduce_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__device__ __forceinline__ float warp_reduce_max(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

__device__ __forceinline__ int warp_reduce_sum(int value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__device__ __forceinline__ int warp_reduce_max(int value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value = max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  return value;
}

}  // namespace ptx
}  // namespace ep_comm
