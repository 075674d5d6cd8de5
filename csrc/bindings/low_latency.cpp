#include "bindings/registry.hpp"

void register_low_latency(pybind11::module_& m) {
  (void)m;
}
