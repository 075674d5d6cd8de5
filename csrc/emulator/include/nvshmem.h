// NVSHMEM for the emulated device: the host and device subset ep_comm's kernels and runtime call,
// with NVSHMEM's names and semantics (csrc/emulator/nvshmem.cpp implements it).
//
// Model: every PE owns a symmetric heap (a memfd every rank process maps); nvshmem_ptr gives a
// peer's mapping unless NVSHMEM_DISABLE_P2P is set (then only the PE's own heap: the network
// path) or the peer is on another emulated node (EP_COMM_RANKS_PER_NODE PEs per node). Puts, signals and atomics to a peer are *delivered late*: they wait in a queue until a
// background "network" thread delivers them in a random order, or until the issuing PE's
// nvshmem_quiet delivers them all. nvshmem_fence orders delivery per destination PE, and a
// put-with-signal lands its data before its signal, as NVSHMEM promises; nothing else is
// ordered. A source buffer is read at delivery, not at the call: reusing it before a quiet sends
// the new contents, as a real NIC may. Sources of non-blocking puts must be symmetric
// (registered) memory.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_runtime.h"  // NVSHMEM's header brings the runtime API in, typed cudaMalloc included
#include "ep_emu/device.hpp"

// The NVSHMEM release whose API this follows.
#define NVSHMEM_VENDOR_MAJOR_VERSION 3
#define NVSHMEM_VENDOR_MINOR_VERSION 0
#define NVSHMEM_VENDOR_PATCH_VERSION 0
#define NVSHMEM_EMULATED 1

enum {
  NVSHMEM_SIGNAL_SET = 9,
  NVSHMEM_SIGNAL_ADD = 10,
};

enum {
  NVSHMEM_CMP_EQ = 0,
  NVSHMEM_CMP_NE,
  NVSHMEM_CMP_GT,
  NVSHMEM_CMP_LE,
  NVSHMEM_CMP_LT,
  NVSHMEM_CMP_GE,
};

enum {
  NVSHMEM_THREAD_SINGLE = 0,
  NVSHMEM_THREAD_FUNNELED,
  NVSHMEM_THREAD_SERIALIZED,
  NVSHMEM_THREAD_MULTIPLE,
};

namespace ep_comm {
namespace emu {
namespace nvshmem {

// Device and host calls land here; `file`/`line` name the caller in fault reports.
void* ptr(const void* address, int pe, const char* file, int line);
int my_pe(const char* file, int line);
int n_pes(const char* file, int line);
// kind: what delivery does at `pe` (a put, a put followed by a signal, or a signal alone).
void put(void* dst, const void* src, size_t bytes, uint64_t* signal, uint64_t value, int signal_op, int pe,
         bool blocking, const char* file, int line);
void fence(const char* file, int line);
void quiet(const char* file, int line);
uint64_t signal_wait_until(uint64_t* signal, int cmp, uint64_t value, const char* file, int line);
uint64_t signal_fetch(const uint64_t* signal, const char* file, int line);

}  // namespace nvshmem
}  // namespace emu
}  // namespace ep_comm

// ---- host (and device) API -----------------------------------------------------------------------
int nvshmem_my_pe(EP_EMU_CALLER);
int nvshmem_n_pes(EP_EMU_CALLER);
void* nvshmem_malloc(size_t bytes);
void nvshmem_free(void* ptr);
void nvshmem_barrier_all();
void nvshmem_finalize();

inline void* nvshmem_ptr(const void* address, int pe, EP_EMU_CALLER) {
  return ::ep_comm::emu::nvshmem::ptr(address, pe, emu_file, emu_line);
}
inline void nvshmem_fence(EP_EMU_CALLER) { ::ep_comm::emu::nvshmem::fence(emu_file, emu_line); }
inline void nvshmem_quiet(EP_EMU_CALLER) { ::ep_comm::emu::nvshmem::quiet(emu_file, emu_line); }

// ---- puts (thread granularity) ------------------------------------------------------------------
inline void nvshmem_putmem(void* dst, const void* src, size_t bytes, int pe, EP_EMU_CALLER) {
  ::ep_comm::emu::nvshmem::put(dst, src, bytes, nullptr, 0, -1, pe, true, emu_file, emu_line);
}
inline void nvshmem_putmem_nbi(void* dst, const void* src, size_t bytes, int pe, EP_EMU_CALLER) {
  ::ep_comm::emu::nvshmem::put(dst, src, bytes, nullptr, 0, -1, pe, false, emu_file, emu_line);
}
inline void nvshmem_putmem_signal_nbi(void* dst, const void* src, size_t bytes, uint64_t* signal, uint64_t value,
                                      int signal_op, int pe, EP_EMU_CALLER) {
  ::ep_comm::emu::nvshmem::put(dst, src, bytes, signal, value, signal_op, pe, false, emu_file, emu_line);
}
inline void nvshmemx_signal_op(uint64_t* signal, uint64_t value, int signal_op, int pe, EP_EMU_CALLER) {
  ::ep_comm::emu::nvshmem::put(nullptr, nullptr, 0, signal, value, signal_op, pe, false, emu_file, emu_line);
}
inline uint64_t nvshmem_signal_fetch(const uint64_t* signal, EP_EMU_CALLER) {
  return ::ep_comm::emu::nvshmem::signal_fetch(signal, emu_file, emu_line);
}
inline uint64_t nvshmem_signal_wait_until(uint64_t* signal, int cmp, uint64_t value, EP_EMU_CALLER) {
  return ::ep_comm::emu::nvshmem::signal_wait_until(signal, cmp, value, emu_file, emu_line);
}

// ---- warp and block granularity: every thread of the warp/block calls with the same arguments;
// one of them issues the operation after the group's barrier (so the group's earlier writes to
// the source happen before it is read).
inline void nvshmemx_putmem_nbi_warp(void* dst, const void* src, size_t bytes, int pe, EP_EMU_CALLER) {
  __syncwarp(0xffffffffu, emu_file, emu_line);
  if (::ep_comm::emu::lane_id() == 0)
    ::ep_comm::emu::nvshmem::put(dst, src, bytes, nullptr, 0, -1, pe, false, emu_file, emu_line);
}
inline void nvshmemx_putmem_signal_nbi_warp(void* dst, const void* src, size_t bytes, uint64_t* signal,
                                            uint64_t value, int signal_op, int pe, EP_EMU_CALLER) {
  __syncwarp(0xffffffffu, emu_file, emu_line);
  if (::ep_comm::emu::lane_id() == 0)
    ::ep_comm::emu::nvshmem::put(dst, src, bytes, signal, value, signal_op, pe, false, emu_file, emu_line);
}
inline void nvshmemx_putmem_nbi_block(void* dst, const void* src, size_t bytes, int pe, EP_EMU_CALLER) {
  __syncthreads(emu_file, emu_line);
  const uint3 t = ::ep_comm::emu::thread_idx();
  if (t.x == 0 && t.y == 0 && t.z == 0)
    ::ep_comm::emu::nvshmem::put(dst, src, bytes, nullptr, 0, -1, pe, false, emu_file, emu_line);
}
inline void nvshmemx_putmem_signal_nbi_block(void* dst, const void* src, size_t bytes, uint64_t* signal,
                                             uint64_t value, int signal_op, int pe, EP_EMU_CALLER) {
  __syncthreads(emu_file, emu_line);
  const uint3 t = ::ep_comm::emu::thread_idx();
  if (t.x == 0 && t.y == 0 && t.z == 0)
    ::ep_comm::emu::nvshmem::put(dst, src, bytes, signal, value, signal_op, pe, false, emu_file, emu_line);
}
