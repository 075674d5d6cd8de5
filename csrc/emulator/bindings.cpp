// What ep_comm._C_emu adds to the kernel bindings: the emulated device's own controls.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include "bindings/registry.hpp"
#include "runtime/errors.hpp"

namespace py = pybind11;

void register_emulator(py::module_& m) {
  m.attr("EMULATED") = true;
  m.def(
      "synchronize",
      [] {
        cudaError_t status;
        {
          py::gil_scoped_release release;  // kernels may wait for this process's other threads
          status = cudaDeviceSynchronize();
        }
        if (status != cudaSuccess) ep_comm::detail::throw_cuda_error(status, "cudaDeviceSynchronize", __FILE__, __LINE__);
      },
      "Wait for every stream of the emulated device; raises the device's fault (a deadlock, a divergent warp "
      "collective, a barrier mismatch, a trap or a hang, naming kernel, block, thread and where each waits).");
  m.def(
      "fault",
      []() -> py::object {
        if (cudaPeekAtLastError() != cudaErrorLaunchFailure) return py::none();
        return py::str(cudaGetErrorString(cudaErrorLaunchFailure));
      },
      "The emulated device's sticky fault report, or None. Like a CUDA context after a fault, the device runs "
      "nothing more in this process.");
}
