// Device helpers whose names carry their memory ordering and scope, so a kernel reads as its
// protocol: `st_release_sys(flag, 1)` publishes everything written before it to every agent
// (peer GPUs and the host); `ld_acquire_sys(flag)` makes what the publisher wrote visible.
//
//   scope  .gpu: threads of this GPU          .sys: peer GPUs (NVLink/IPC) and the host
//   order  relaxed: atomic, no ordering       acquire/release: one-way barriers around it
//
// All are `asm volatile` with a "memory" clobber, so the compiler neither drops nor moves
// other memory accesses across them. Targets sm_70+ (written for sm_90).
#pragma once

#include <cstdint>

namespace ep_comm {
namespace ptx {

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

// ---------------------------------------------------------------------------------------
// Warp helpers
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ int lane_id() {
  int lane;
  asm volatile("mov.s32 %0, %%laneid;" : "=r"(lane));
  return lane;
}

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
