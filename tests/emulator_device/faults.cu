// Faults the emulated device must report (each case in its own process: a fault is sticky), and
// launches it must refuse. A fault case prints the synchronisation's error for the Python side,
// which checks that it names the kernel, the block, the thread(s) and the lines tagged `@tag`.
#include "harness.hpp"

namespace ptx = ep_comm::ptx;

namespace {

// Block 1's two warps each wait at the barrier the other reaches only afterwards.
__global__ void deadlock_kernel(int* done) {
  if (blockIdx.x == 1) {
    if (threadIdx.x < 32) {
      ptx::named_barrier(1, 64);  // @tag deadlock_warp0
      ptx::named_barrier(2, 64);
    } else {
      ptx::named_barrier(2, 64);  // @tag deadlock_warp1
      ptx::named_barrier(1, 64);
    }
  }
  done[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

EMU_CASE(deadlock) {
  int* done = emu_test::device_alloc<int>(128);
  EP_LAUNCH_KERNEL(deadlock_kernel, 2, 64, 0, emu_test::kDefaultStream, done);
  CUDA_OK(cudaGetLastError());  // the launch itself is fine
  return emu_test::print_fault("sync", cudaDeviceSynchronize());
}

// Lane 7 of every warp skips the shuffle and goes on to the next collective.
__global__ void skipped_shuffle_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 != 7) v = __shfl_sync(0xffffffffu, v, 0);  // @tag skip_shfl
  __syncwarp();  // @tag skip_syncwarp
  out[threadIdx.x] = v;
}

EMU_CASE(divergent_skip) {
  int* out = emu_test::device_alloc<int>(64);
  EP_LAUNCH_KERNEL(skipped_shuffle_kernel, 1, 64, 0, emu_test::kDefaultStream, out);
  return emu_test::print_fault("sync", cudaDeviceSynchronize());
}

// In block 1, warp 1, lane 5 ballots over lanes 0-5 while the rest of its warp ballots over all.
__global__ void divergent_mask_kernel(unsigned* out) {
  const int lane = threadIdx.x % 32;
  unsigned ballot;
  if (blockIdx.x == 1 && threadIdx.x == 37)
    ballot = __ballot_sync(0x0000003fu, 1);  // @tag mask_lane5
  else
    ballot = __ballot_sync(0xffffffffu, lane < 10);  // @tag mask_others
  out[blockIdx.x * blockDim.x + threadIdx.x] = ballot;
}

EMU_CASE(divergent_mask) {
  auto* out = emu_test::device_alloc<unsigned>(128);
  EP_LAUNCH_KERNEL(divergent_mask_kernel, 2, 64, 0, emu_test::kDefaultStream, out);
  return emu_test::print_fault("sync", cudaDeviceSynchronize());
}

// Lane 31 of warp 0 leaves before a shuffle the other lanes wait in.
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 3);  // @tag exit_shfl
}

EMU_CASE(divergent_exit) {
  int* out = emu_test::device_alloc<int>(32);
  EP_LAUNCH_KERNEL(exited_lane_kernel, 1, 32, 0, emu_test::kDefaultStream, out);
  return emu_test::print_fault("sync", cudaDeviceSynchronize());
}

// In block 2, warp 0 waits for 64 threads at barrier 1, warp 1 for 96.
__global__ void barrier_mismatch_kernel(int* out) {
  if (blockIdx.x == 2) {
    if (threadIdx.x < 32)
      ptx::named_barrier(1, 64);  // @tag mismatch_64
    else if (threadIdx.x < 64)
      ptx::named_barrier(1, 96);  // @tag mismatch_96
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

EMU_CASE(barrier_mismatch) {
  int* out = emu_test::device_alloc<int>(3 * 128);
  EP_LAUNCH_KERNEL(barrier_mismatch_kernel, 3, 128, 0, emu_test::kDefaultStream, out);
  return emu_test::print_fault("sync", cudaDeviceSynchronize());
}

// A named barrier whose thread count is not a multiple of the warp size.
__global__ void barrier_not_warp_multiple_kernel(int* out) {
  if (threadIdx.x < 48) ptx::named_barrier(3, 48);  // @tag count_48
  out[threadIdx.x] = 1;
}

EMU_CASE(barrier_not_warp_multiple) {
  int* out = emu_test::device_alloc<int>(64);
  EP_LAUNCH_KERNEL(barrier_not_warp_multiple_kernel, 1, 64, 0, emu_test::kDefaultStream, out);
  return emu_test::print_fault("sync", cudaDeviceSynchronize());
}

__global__ void trap_kernel(int* out) {
  if (blockIdx.x == 2 && threadIdx.x == 37) __trap();  // @tag trap
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

EMU_CASE(trap) {
  int* out = emu_test::device_alloc<int>(4 * 64);
  EP_LAUNCH_KERNEL(trap_kernel, 4, 64, 0, emu_test::kDefaultStream, out);
  return emu_test::print_fault("sync", cudaDeviceSynchronize());
}

// Block 1's thread 0 waits for a flag nobody sets; the rest of its block waits for it.
__global__ void hang_kernel(const int* flag) {
  if (blockIdx.x == 1) {
    if (threadIdx.x == 0)
      while (ptx::ld_acquire_sys(flag) != 1) {  // @tag hang_spin
      }
    __syncthreads();  // @tag hang_sync
  }
}

EMU_CASE(hang) {
  int* flag = emu_test::device_alloc<int>(1);
  CUDA_OK(cudaMemset(flag, 0, sizeof(int)));
  std::printf("FLAG_ADDRESS %p\n", static_cast<void*>(flag));
  EP_LAUNCH_KERNEL(hang_kernel, 2, 64, 0, emu_test::kDefaultStream, flag);
  return emu_test::print_fault("sync", cudaDeviceSynchronize());
}

// ---- after a fault: nothing more runs, and every synchronisation reports the first fault ---------------

__global__ void set_flag_kernel(int* flag, int value) {
  if (threadIdx.x == 0) ptx::st_release_sys(flag, value);
}

EMU_CASE(sticky_fault) {
  int* host_flag = nullptr;  // host memory, readable whatever the device's state
  CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&host_flag), sizeof(int), cudaHostAllocMapped));
  int* flag = nullptr;
  CUDA_OK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&flag), host_flag, 0));
  *host_flag = 0;
  int* out = emu_test::device_alloc<int>(4 * 64);
  cudaStream_t other;
  CUDA_OK(cudaStreamCreate(&other));

  // Sanity: the flag kernel runs while the device is healthy.
  EP_LAUNCH_KERNEL(set_flag_kernel, 1, 32, 0, emu_test::kDefaultStream, flag, 1);
  CUDA_OK(cudaDeviceSynchronize());
  CHECK(*host_flag == 1, "the flag kernel did not run on a healthy device");

  EP_LAUNCH_KERNEL(trap_kernel, 4, 64, 0, emu_test::kDefaultStream, out);
  EP_LAUNCH_KERNEL(set_flag_kernel, 1, 32, 0, emu_test::kDefaultStream, flag, 2);  // queued behind the fault
  const cudaError_t first = cudaDeviceSynchronize();
  CHECK(first == cudaErrorLaunchFailure, "first sync: %s", cudaGetErrorName(first));
  const std::string first_message = cudaGetErrorString(first);

  // Launches after the fault, on either stream, do not run; a second faulting kernel changes nothing.
  EP_LAUNCH_KERNEL(set_flag_kernel, 1, 32, 0, emu_test::kDefaultStream, flag, 3);
  EP_LAUNCH_KERNEL(set_flag_kernel, 1, 32, 0, other, flag, 4);
  EP_LAUNCH_KERNEL(deadlock_kernel, 2, 64, 0, other, out);
  const cudaError_t stream_status = cudaStreamSynchronize(other);
  const cudaError_t again = cudaDeviceSynchronize();
  CHECK(*host_flag == 1, "a launch after the fault ran: the flag is %d", *host_flag);
  CHECK(stream_status == cudaErrorLaunchFailure, "stream sync after the fault: %s", cudaGetErrorName(stream_status));
  CHECK(again == cudaErrorLaunchFailure, "device sync after the fault: %s", cudaGetErrorName(again));
  CHECK(first_message == cudaGetErrorString(again), "the report changed: %s", cudaGetErrorString(again));
  const cudaError_t last = cudaGetLastError();
  CHECK(last == cudaErrorLaunchFailure, "cudaGetLastError after the fault: %s", cudaGetErrorName(last));
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure, "the fault must stay (sticky), not be cleared");
  void* p = nullptr;
  const cudaError_t alloc = cudaMalloc(&p, 256);
  CHECK(alloc != cudaSuccess, "cudaMalloc succeeded on a faulted device");
  std::printf("flag %d\n", *host_flag);
  return emu_test::print_fault("sync", again);
}

// ---- launches the device refuses: reported by cudaGetLastError, nothing sticky ------------------------------

__global__ void counting_kernel(int* count) {
  atomicAdd(count, 1);
}

__global__ void shared_hungry_kernel(int* count, int num_ints) {
  EP_DYNAMIC_SHARED(int, s_data);
  s_data[num_ints - 1] = 1;  // the last int of what the launch asked for
  atomicAdd(count, s_data[num_ints - 1]);
}

EMU_CASE(launch_refusal) {
  int* count = emu_test::device_alloc<int>(1);
  CUDA_OK(cudaMemset(count, 0, sizeof(int)));
  struct Bad {
    const char* what;
    dim3 grid, block;
    size_t shared;
  };
  const Bad bad[] = {
      {"1025 threads", dim3(1), dim3(1025), 0},
      {"32x32x2 threads", dim3(1), dim3(32, 32, 2), 0},
      {"block z 65", dim3(1), dim3(1, 1, 65), 0},
      {"0 blocks", dim3(0), dim3(32), 0},
      {"grid y 0", dim3(2, 0, 1), dim3(32), 0},
  };
  for (const Bad& b : bad) {
    EP_LAUNCH_KERNEL(counting_kernel, b.grid, b.block, b.shared, emu_test::kDefaultStream, count);
    const cudaError_t e = cudaGetLastError();
    CHECK(e == cudaErrorInvalidConfiguration, "%s: cudaGetLastError() = %s", b.what, cudaGetErrorName(e));
    CHECK(cudaGetLastError() == cudaSuccess, "%s: the launch error was not cleared by reading it", b.what);
    CHECK(cudaDeviceSynchronize() == cudaSuccess, "%s: a refused launch left a sticky error", b.what);
  }
  // Dynamic shared memory: 48 KiB without the attribute, more only after cudaFuncSetAttribute.
  EP_LAUNCH_KERNEL(shared_hungry_kernel, 1, 32, 48 * 1024 + 16, emu_test::kDefaultStream, count, 48 * 256 + 4);
  const cudaError_t over = cudaGetLastError();
  CHECK(over == cudaErrorInvalidConfiguration, "48 KiB + 16 without the attribute: %s", cudaGetErrorName(over));
  CHECK(cudaDeviceSynchronize() == cudaSuccess, "a refused launch left a sticky error");
  CHECK(to_host(count, 1)[0] == 0, "a refused launch ran: count %d", to_host(count, 1)[0]);

  EP_LAUNCH_KERNEL(shared_hungry_kernel, 1, 32, 48 * 1024, emu_test::kDefaultStream, count, 48 * 256);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  CHECK(to_host(count, 1)[0] == 32, "48 KiB launch: count %d", to_host(count, 1)[0]);

  const cudaError_t too_much =
      cudaFuncSetAttribute(shared_hungry_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 1 << 20);
  CHECK(too_much == cudaErrorInvalidValue, "a 1 MiB shared memory limit was accepted: %s", cudaGetErrorName(too_much));
  CHECK(cudaGetLastError() == cudaErrorInvalidValue, "the refused attribute did not set the last error");
  CUDA_OK(cudaFuncSetAttribute(shared_hungry_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024));
  EP_LAUNCH_KERNEL(shared_hungry_kernel, 1, 32, 96 * 1024, emu_test::kDefaultStream, count, 96 * 256);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  CHECK(to_host(count, 1)[0] == 64, "96 KiB launch with the attribute: count %d", to_host(count, 1)[0]);
  EP_LAUNCH_KERNEL(shared_hungry_kernel, 1, 32, 96 * 1024 + 16, emu_test::kDefaultStream, count, 96 * 256 + 4);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "above the raised limit");
  // The limit belongs to that kernel alone.
  EP_LAUNCH_KERNEL(counting_kernel, 1, 32, 64 * 1024, emu_test::kDefaultStream, count);
  CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "another kernel got the raised limit");

  // The largest legal block still runs.
  EP_LAUNCH_KERNEL(counting_kernel, 2, 1024, 0, emu_test::kDefaultStream, count);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaDeviceSynchronize());
  const int final_count = to_host(count, 1)[0];
  CHECK(final_count == 64 + 2048, "count %d after the 2 x 1024 launch", final_count);
  std::printf("count %d\n", final_count);
  return 0;
}

}  // namespace
