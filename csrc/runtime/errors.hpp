// One exception type for every failure the runtime reports, and the macros that raise it.
// The bindings translate ep_comm::Error into a Python RuntimeError (subclass ep_comm._C.Error).
// Header-only so that host code in .cu files (launchers) and .cpp files use the same macros.
#pragma once

#include <cuda_runtime_api.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace ep_comm {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// "cudaErrorNoDevice (100): no CUDA-capable device is detected". Needs no driver.
inline std::string cuda_error_text(int status) {
  const auto err = static_cast<cudaError_t>(status);
  std::ostringstream os;
  os << cudaGetErrorName(err) << " (" << status << "): " << cudaGetErrorString(err);
  return os.str();
}

// Names of nvshmemx_status values; spelled out here so this header needs no NVSHMEM include
// (the values have been stable since NVSHMEM 2.x).
inline const char* nvshmem_status_name(int status) {
  static const char* const kNames[] = {
      "NVSHMEMX_SUCCESS",          "NVSHMEMX_ERROR_INVALID_VALUE",
      "NVSHMEMX_ERROR_OUT_OF_MEMORY", "NVSHMEMX_ERROR_NOT_SUPPORTED",
      "NVSHMEMX_ERROR_SYMMETRY",   "NVSHMEMX_ERROR_GPU_NOT_SELECTED",
      "NVSHMEMX_ERROR_COLLECTIVE_LAUNCH_FAILED", "NVSHMEMX_ERROR_INTERNAL"};
  if (status >= 0 && status < static_cast<int>(sizeof(kNames) / sizeof(kNames[0])))
    return kNames[status];
  return "NVSHMEMX_ERROR_<unknown>";
}

namespace detail {

[[noreturn]] inline void throw_cuda_error(int status, const char* call, const char* file,
                                          int line) {
  // A failed runtime call is also recorded as the "last error"; clear it so that a later
  // cudaGetLastError() after a kernel launch does not report this stale failure.
  (void)cudaGetLastError();
  std::ostringstream os;
  os << "CUDA error " << cuda_error_text(status) << " in `" << call << "` at " << file << ":"
     << line;
  throw Error(os.str());
}

[[noreturn]] inline void throw_nvshmem_error(int status, const char* call, const char* file,
                                             int line) {
  std::ostringstream os;
  os << "NVSHMEM error " << nvshmem_status_name(status) << " (" << status << ") in `" << call
     << "` at " << file << ":" << line;
  throw Error(os.str());
}

[[noreturn]] inline void throw_assert(const char* cond, const std::string& msg, const char* file,
                                      int line) {
  std::ostringstream os;
  os << msg << " (check `" << cond << "` failed at " << file << ":" << line << ")";
  throw Error(os.str());
}

}  // namespace detail
}  // namespace ep_comm

// EP_CUDA_CHECK(cudaMalloc(&p, n)): throws ep_comm::Error on any status but cudaSuccess.
#define EP_CUDA_CHECK(call)                                                              \
  do {                                                                                   \
    const cudaError_t ep_cuda_status_ = (call);                                          \
    if (ep_cuda_status_ != cudaSuccess)                                                  \
      ::ep_comm::detail::throw_cuda_error(static_cast<int>(ep_cuda_status_), #call,      \
                                          __FILE__, __LINE__);                           \
  } while (0)

// After a kernel launch: reports a bad launch configuration (not errors inside the kernel).
#define EP_CUDA_CHECK_LAUNCH() EP_CUDA_CHECK(cudaGetLastError())

// EP_NVSHMEM_CHECK(nvshmemx_...(...)): for NVSHMEM calls returning an int status (0 = success).
#define EP_NVSHMEM_CHECK(call)                                                               \
  do {                                                                                       \
    const int ep_nvshmem_status_ = static_cast<int>(call);                                   \
    if (ep_nvshmem_status_ != 0)                                                             \
      ::ep_comm::detail::throw_nvshmem_error(ep_nvshmem_status_, #call, __FILE__, __LINE__); \
  } while (0)

// EP_HOST_ASSERT(n > 0, "num_tokens must be positive, got " + std::to_string(n)):
// msg is only evaluated when the check fails.
#define EP_HOST_ASSERT(cond, msg)                                                 \
  do {                                                                            \
    if (!(cond)) ::ep_comm::detail::throw_assert(#cond, (msg), __FILE__, __LINE__); \
  } while (0)
