#include "bindings/registry.hpp"

void register_intranode(pybind11::module_& m) {
  (void)m;
}
