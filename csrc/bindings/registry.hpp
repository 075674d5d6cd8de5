// Each kernel family registers its Python bindings from its own file, so that engineers
// working on different families never edit the same file. module.cpp calls all of them.
// Bindings pass ints, pointers (as uintptr_t), bytes and streams (as uintptr_t), never torch.
#pragma once

#include <pybind11/pybind11.h>

void register_runtime(pybind11::module_& m);      // bindings/runtime.cpp
void register_intranode(pybind11::module_& m);    // bindings/intranode.cpp
void register_internode(pybind11::module_& m);    // bindings/internode.cpp
void register_low_latency(pybind11::module_& m);  // bindings/low_latency.cpp
void register_microbench(pybind11::module_& m);   // bindings/microbench.cpp
void register_emulator(pybind11::module_& m);     // emulator/bindings.cpp (ep_comm._C_emu only)
