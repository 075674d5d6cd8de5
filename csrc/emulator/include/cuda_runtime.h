// The emulated device's stand-in for CUDA's cuda_runtime.h: the runtime API subset and the
// kernel language (csrc/emulator/include/ep_emu/device.hpp).
#pragma once

#include "cuda_runtime_api.h"
#include "ep_emu/device.hpp"

// CUDA's typed overload (cuda_runtime.h declares it too).
template <typename T>
inline cudaError_t cudaMalloc(T** ptr, size_t size) {
  return cudaMalloc(reinterpret_cast<void**>(ptr), size);
}
