// The emulated device's stand-in for CUDA's cuda_runtime.h: the runtime API subset and the
// kernel language (csrc/emulator/include/ep_emu/device.hpp).
#pragma once

#include "cuda_runtime_api.h"
#include "ep_emu/device.hpp"
