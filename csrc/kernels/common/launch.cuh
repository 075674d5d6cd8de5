// Kernel launches and dynamic shared memory, written once for both targets: nvcc's `<<<...>>>`
// and `extern __shared__`, or the emulated device's launcher (csrc/emulator), which runs every
// block of the grid at once on CPU threads. With ptx.cuh, the only kernel header that knows
// about the emulator.
//
//   EP_LAUNCH_KERNEL(my_kernel, num_blocks, num_threads, shared_bytes, stream, arg0, arg1);
//   EP_DYNAMIC_SHARED(int, s_bins);   // inside the kernel: int* s_bins, 16-byte aligned
#pragma once

#ifdef EP_COMM_EMULATOR
#include "ep_emu/device.hpp"

// The arguments are copied into the launch, as CUDA copies kernel parameters. The function's
// address keys its cudaFuncSetAttribute limits (dynamic shared memory above 48 KiB).
#define EP_LAUNCH_KERNEL(kernel, grid, block, shared_bytes, stream, ...)                           \
  ::ep_comm::emu::launch_kernel(#kernel, reinterpret_cast<const void*>(&kernel), (grid), (block), \
                                (shared_bytes), (stream), [=]() { kernel(__VA_ARGS__); })
#define EP_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::ep_comm::emu::dynamic_shared_memory())
#else
#define EP_LAUNCH_KERNEL(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<(grid), (block), (shared_bytes), (stream)>>>(__VA_ARGS__)
#define EP_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif
