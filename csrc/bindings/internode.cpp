#include "bindings/registry.hpp"

void register_internode(pybind11::module_& m) {
  (void)m;
}
