// What the emulator's runtime (runtime.cpp: streams, memory, errors) and its execution engine
// (scheduler.cpp: blocks and fibers) share. Internal to csrc/emulator.
#pragma once

#include <atomic>
#include <mutex>
#include <string>

#include "ep_emu/device.hpp"

namespace ep_comm {
namespace emu {

// One kernel launch, shared by the blocks that run it.
struct LaunchState {
  std::string name;
  dim3 grid, block;
  size_t shared_bytes = 0;
  KernelBody body;
  long long hang_ns = 0;  // a block that makes no progress for this long is reported as hung
  int device = 0;         // the device whose stream runs it (NVSHMEM calls find their PE by it)

  bool aborted() const { return aborted_.load(std::memory_order_acquire); }
  // Records the first fault and stops every block of the launch.
  void fail(const std::string& message) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (error_.empty()) error_ = message;
    }
    aborted_.store(true, std::memory_order_release);
  }
  std::string error() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
  }

 private:
  std::atomic<bool> aborted_{false};
  mutable std::mutex mutex_;
  std::string error_;
};

// Runs every block of the launch at once and returns when all have finished (scheduler.cpp).
void run_grid(LaunchState* launch);

// The device of the kernel the calling thread runs, or -1 outside a kernel (scheduler.cpp).
int kernel_device();
// The device whose work the calling thread does: its kernel's, else the host thread's current
// device (runtime.cpp).
int current_device();
// Records a fault as the device's sticky error, like a failed kernel does (runtime.cpp).
void record_device_fault(const std::string& message);

}  // namespace emu
}  // namespace ep_comm
