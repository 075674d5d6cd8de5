#include "runtime/device.hpp"

#include <cuda_runtime_api.h>

#include "runtime/errors.hpp"

namespace ep_comm {

int device_count() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  switch (status) {
    case cudaSuccess:
      return count;
    // No driver, no device, or only the driver stub: a CPU-only machine, not an error.
    case cudaErrorInsufficientDriver:
    case cudaErrorNoDevice:
    case cudaErrorStubLibrary:
      (void)cudaGetLastError();
      return 0;
    default:
      EP_CUDA_CHECK(status);
      return 0;
  }
}

DeviceProperties get_device_properties(int device) {
  cudaDeviceProp prop{};
  EP_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  DeviceProperties out;
  out.name = prop.name;
  out.num_sms = prop.multiProcessorCount;
  out.major = prop.major;
  out.minor = prop.minor;
  out.total_memory = prop.totalGlobalMem;
  out.max_shared_memory_per_block_optin = prop.sharedMemPerBlockOptin;
  out.pci_bus_id = prop.pciBusID;
  out.pci_device_id = prop.pciDeviceID;
  return out;
}

int current_device() {
  int device = -1;
  EP_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

}  // namespace ep_comm
