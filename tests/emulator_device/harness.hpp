// Test harness for the emulated device's own tests (tests/test_emulator_device.py): one
// executable, one case per run (`emulator_device_cases <case> [args]`), because a kernel fault is
// sticky for the process as it is for a CUDA context.
//
// Sources are compiled as C++ with the emulator's flags (setup.py emulator_flags): kernels are
// written as for nvcc, launched through EP_LAUNCH_KERNEL, with ptx.cuh's primitives.
//
// Output the Python side reads: `PASS` when a case's own checks held, `RESULT ...` lines that
// must agree between fiber schedules, and for fault cases the error between `MESSAGE_BEGIN` and
// `MESSAGE_END`. Lines the assertions look for are tagged in the sources with `// @tag name`.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "kernels/common/launch.cuh"
#include "kernels/common/ptx.cuh"

namespace emu_test {

using CaseFn = int (*)(int argc, char** argv);
std::map<std::string, CaseFn>& registry();
struct Register {
  Register(const char* name, CaseFn fn) { registry()[name] = fn; }
};

constexpr cudaStream_t kDefaultStream = nullptr;

template <typename T>
T* device_alloc(size_t count);

// Prints the error of a synchronisation that must report a kernel fault, for the Python side.
inline int print_fault(const char* what, cudaError_t status) {
  std::printf("%s %s\n", what, cudaGetErrorName(status));
  std::printf("MESSAGE_BEGIN\n%s\nMESSAGE_END\n", cudaGetErrorString(status));
  std::fflush(stdout);
  return status == cudaErrorLaunchFailure ? 0 : 1;
}

}  // namespace emu_test

#define EMU_CASE(name)                                                         \
  static int case_##name(int argc, char** argv);                               \
  static ::emu_test::Register register_##name(#name, case_##name);             \
  static int case_##name([[maybe_unused]] int argc, [[maybe_unused]] char** argv)

#define CHECK(cond, ...)                                                                \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::printf("CHECK FAILED at %s:%d: %s: ", __FILE__, __LINE__, #cond);            \
      std::printf(__VA_ARGS__);                                                         \
      std::printf("\n");                                                                \
      std::fflush(stdout);                                                              \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

#define CUDA_OK(call)                                                                            \
  do {                                                                                           \
    const cudaError_t status_ = (call);                                                          \
    if (status_ != cudaSuccess) {                                                                \
      std::printf("CUDA FAILED at %s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call,             \
                  cudaGetErrorName(status_), cudaGetErrorString(status_));                       \
      std::fflush(stdout);                                                                       \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

template <typename T>
T* emu_test::device_alloc(size_t count) {
  void* p = nullptr;
  CUDA_OK(cudaMalloc(&p, count * sizeof(T)));
  return static_cast<T*>(p);
}

// Copies `count` elements of device memory back to a host vector.
template <typename T>
std::vector<T> to_host(const T* device, size_t count) {
  std::vector<T> host(count);
  CUDA_OK(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}
