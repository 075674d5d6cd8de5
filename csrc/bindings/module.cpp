// ep_comm._C (nvcc) and ep_comm._C_emu (the same sources for the emulated device, csrc/emulator):
// the only Python entry points into the C++/CUDA code. Importing either must work on a machine
// without a GPU or driver, so nothing here touches CUDA at import time.
#include <pybind11/pybind11.h>

#include "bindings/registry.hpp"
#include "runtime/errors.hpp"

#ifndef EP_COMM_MODULE_NAME
#define EP_COMM_MODULE_NAME _C
#endif

PYBIND11_MODULE(EP_COMM_MODULE_NAME, m) {
#ifdef EP_COMM_EMULATOR
  m.doc() = "ep_comm kernels on the emulated device: CPU threads, host memory (pointers, sizes and streams in; no torch)";
#else
  m.doc() = "ep_comm CUDA/NVSHMEM kernels (pointers, sizes and streams in; no torch)";
#endif
  // ep_comm::Error -> <module>.Error, a subclass of RuntimeError (local: both modules translate it).
  pybind11::register_local_exception<ep_comm::Error>(m, "Error", PyExc_RuntimeError);

  register_runtime(m);
  register_intranode(m);
  register_low_latency(m);
  register_internode(m);
#ifdef EP_COMM_EMULATOR
  register_emulator(m);
#else
  register_microbench(m);
#endif
}
