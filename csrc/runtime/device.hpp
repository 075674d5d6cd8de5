// Device queries that tolerate a machine without a GPU or driver.
#pragma once

#include <cstddef>
#include <string>

namespace ep_comm {

struct DeviceProperties {
  std::string name;
  int num_sms = 0;
  int major = 0;  // compute capability
  int minor = 0;
  std::size_t total_memory = 0;  // bytes
  std::size_t max_shared_memory_per_block_optin = 0;  // bytes, for kernels that opt in
  int pci_bus_id = 0;
  int pci_device_id = 0;
};

// Number of visible CUDA devices; 0 (not an error) when there is no driver or no device.
int device_count();

// Throws ep_comm::Error when the device does not exist or there is no driver.
DeviceProperties get_device_properties(int device);

// The calling thread's current device. Throws without a device.
int current_device();

}  // namespace ep_comm
