// ep_comm._C: the only Python entry point into the C++/CUDA code. Importing it must work on
// a machine without a GPU or driver, so nothing here touches CUDA at import time.
#include <pybind11/pybind11.h>

#include "bindings/registry.hpp"
#include "runtime/errors.hpp"

PYBIND11_MODULE(_C, m) {
  m.doc() = "ep_comm CUDA/NVSHMEM kernels (pointers, sizes and streams in; no torch)";
  // ep_comm::Error -> ep_comm._C.Error, a subclass of RuntimeError.
  pybind11::register_exception<ep_comm::Error>(m, "Error", PyExc_RuntimeError);

  register_runtime(m);
  register_intranode(m);
  register_internode(m);
  register_low_latency(m);
  register_microbench(m);
}
