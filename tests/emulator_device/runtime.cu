// The emulated CUDA runtime: device memory (guard page, garbage fill), streams, events, async
// copies and IPC handles between processes.
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <thread>

#include "harness.hpp"

extern char** environ;

namespace ptx = ep_comm::ptx;

namespace {

// Host-mapped memory the host flips to let a gated kernel go (so the host sees a stream blocked).
struct Gate {
  int* host = nullptr;
  int* device = nullptr;
  Gate() {
    CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(int), cudaHostAllocMapped));
    CUDA_OK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device), host, 0));
    __atomic_store_n(host, 0, __ATOMIC_RELEASE);
  }
  void open() { __atomic_store_n(host, 1, __ATOMIC_RELEASE); }
};

__global__ void gate_kernel(const int* gate) {
  if (threadIdx.x == 0)
    while (ptx::ld_acquire_sys(gate) == 0) {
    }
  __syncthreads();
}

__global__ void write_kernel(int* p, size_t index, int value) {
  if (threadIdx.x == 0) p[index] = value;
}

// ---- memory ---------------------------------------------------------------------------------------------

EMU_CASE(guard_page) {
  constexpr size_t n = 4096 / sizeof(int) * 3 + 64;  // 12544 bytes: a multiple of 256, not of the page
  static_assert(n * sizeof(int) % 256 == 0, "the allocation must end at cudaMalloc's alignment");
  int* p = emu_test::device_alloc<int>(n);
  EP_LAUNCH_KERNEL(write_kernel, 1, 32, 0, emu_test::kDefaultStream, p, n - 1, 42);
  CUDA_OK(cudaDeviceSynchronize());
  CHECK(to_host(p + n - 1, 1)[0] == 42, "the last element");
  std::printf("last element written\n");
  std::fflush(stdout);
  EP_LAUNCH_KERNEL(write_kernel, 1, 32, 0, emu_test::kDefaultStream, p, n, 43);  // one past the end
  cudaDeviceSynchronize();
  std::printf("the write past the end did not fault\n");
  return 1;
}

EMU_CASE(fresh_memory) {
  for (size_t bytes : {size_t(256), size_t(4096), size_t(100000), size_t(1) << 20}) {
    unsigned char* p = emu_test::device_alloc<unsigned char>(bytes);
    const auto got = to_host(p, bytes);
    size_t zeros = 0;
    for (unsigned char c : got) zeros += c == 0;
    CHECK(zeros == 0, "%zu fresh bytes: %zu are zero", bytes, zeros);
    CHECK(got[0] == 0xA5 && got[bytes - 1] == 0xA5, "%zu fresh bytes: fill %02x", bytes, got[0]);
    // Freed and allocated again: still garbage, not the previous contents nor zeros.
    CUDA_OK(cudaMemset(p, 0, bytes));
    CUDA_OK(cudaFree(p));
    p = emu_test::device_alloc<unsigned char>(bytes);
    CHECK(to_host(p, 1)[0] == 0xA5, "%zu bytes allocated again start as %02x", bytes, to_host(p, 1)[0]);
    CUDA_OK(cudaFree(p));
  }
  return 0;
}

// ---- streams and events -------------------------------------------------------------------------------------

__global__ void append_kernel(int* log, int* next, int id) {
  if (threadIdx.x == 0) log[atomicAdd(next, 1)] = id;
}

__global__ void add_one_kernel(unsigned char* p, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) p[i] = static_cast<unsigned char>(p[i] + 1);
}

// Kernels, memsets and copies of one stream run in order, behind a kernel the host holds back.
EMU_CASE(stream_order) {
  constexpr int n = 4096;
  Gate gate;
  cudaStream_t s;
  CUDA_OK(cudaStreamCreate(&s));
  int* log = emu_test::device_alloc<int>(8);
  int* next = emu_test::device_alloc<int>(1);
  auto* a = emu_test::device_alloc<unsigned char>(n);
  auto* b = emu_test::device_alloc<unsigned char>(n);
  CUDA_OK(cudaMemset(log, 0, 8 * sizeof(int)));
  CUDA_OK(cudaMemset(next, 0, sizeof(int)));
  std::vector<unsigned char> host(n, 0x33);
  unsigned char* mapped = nullptr;  // host memory the kernels and async calls reach through its device pointer
  CUDA_OK(cudaHostAlloc(reinterpret_cast<void**>(&mapped), n, cudaHostAllocMapped));
  unsigned char* mapped_device = nullptr;
  CUDA_OK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&mapped_device), mapped, 0));
  std::memset(mapped, 0x33, n);

  EP_LAUNCH_KERNEL(gate_kernel, 1, 32, 0, s, gate.device);
  EP_LAUNCH_KERNEL(append_kernel, 1, 32, 0, s, log, next, 1);
  CUDA_OK(cudaMemsetAsync(mapped_device, 0x11, n, s));
  CUDA_OK(cudaMemcpyAsync(a, mapped_device, n, cudaMemcpyDeviceToDevice, s));
  EP_LAUNCH_KERNEL(add_one_kernel, 1, 64, 0, s, a, n);  // 0x12, only if it runs after the memset
  EP_LAUNCH_KERNEL(append_kernel, 1, 32, 0, s, log, next, 2);
  CUDA_OK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, s));
  EP_LAUNCH_KERNEL(add_one_kernel, 1, 64, 0, s, b, n);  // 0x13
  CUDA_OK(cudaMemcpyAsync(host.data(), b, n, cudaMemcpyDeviceToHost, s));
  EP_LAUNCH_KERNEL(append_kernel, 1, 32, 0, s, log, next, 3);
  CUDA_OK(cudaGetLastError());

  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const cudaError_t pending = cudaStreamQuery(s);
  CHECK(pending == cudaErrorNotReady, "the held-back stream reports %s", cudaGetErrorName(pending));
  CHECK(__atomic_load_n(&host[0], __ATOMIC_RELAXED) == 0x33, "the copy to the host ran before the gate opened");
  CHECK(__atomic_load_n(&mapped[n - 1], __ATOMIC_RELAXED) == 0x33, "the memset ran before the gate opened");
  CHECK(__atomic_load_n(next, __ATOMIC_RELAXED) == 0, "a kernel behind the gate ran");
  gate.open();
  CUDA_OK(cudaStreamSynchronize(s));
  CHECK(cudaStreamQuery(s) == cudaSuccess, "the stream is idle after synchronising");
  const auto order = to_host(log, 4);
  CHECK(order[0] == 1 && order[1] == 2 && order[2] == 3 && order[3] == 0, "order %d %d %d %d", order[0], order[1],
        order[2], order[3]);
  for (int i = 0; i < n; ++i) CHECK(host[i] == 0x13, "host[%d] = %02x", i, host[i]);
  for (int i = 0; i < n; ++i) CHECK(mapped[i] == 0x11, "mapped[%d] = %02x", i, mapped[i]);
  const auto in_a = to_host(a, n);
  for (int i = 0; i < n; ++i) CHECK(in_a[i] == 0x12, "a[%d] = %02x", i, in_a[i]);
  CUDA_OK(cudaStreamDestroy(s));
  CUDA_OK(cudaFreeHost(mapped));
  return 0;
}

__global__ void read_flag_kernel(const int* flag, int* result) {
  if (threadIdx.x == 0) *result = ptx::ld_acquire_sys(flag);
}

// Stream B waits for an event recorded on stream A; stream C, which does not wait, is not held up.
EMU_CASE(stream_wait_event) {
  Gate gate;
  cudaStream_t a, b, c;
  CUDA_OK(cudaStreamCreate(&a));
  CUDA_OK(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking));
  CUDA_OK(cudaStreamCreate(&c));
  cudaEvent_t done_a;
  CUDA_OK(cudaEventCreateWithFlags(&done_a, cudaEventDisableTiming));
  int* flag = emu_test::device_alloc<int>(1);
  int* results = emu_test::device_alloc<int>(2);
  CUDA_OK(cudaMemset(flag, 0, sizeof(int)));
  CUDA_OK(cudaMemset(results, 0xff, 2 * sizeof(int)));

  EP_LAUNCH_KERNEL(gate_kernel, 1, 32, 0, a, gate.device);
  EP_LAUNCH_KERNEL(write_kernel, 1, 32, 0, a, flag, 0, 1);
  CUDA_OK(cudaEventRecord(done_a, a));
  CUDA_OK(cudaStreamWaitEvent(b, done_a, 0));
  EP_LAUNCH_KERNEL(read_flag_kernel, 1, 32, 0, b, flag, results);
  EP_LAUNCH_KERNEL(read_flag_kernel, 1, 32, 0, c, flag, results + 1);

  // C finishes while A is held back: the streams really are concurrent, so B's order is the event's.
  // (Read through stream C: cudaMemcpy would wait for the held-back stream A, as on a GPU.)
  int seen_by_c = -1;
  CUDA_OK(cudaMemcpyAsync(&seen_by_c, results + 1, sizeof(int), cudaMemcpyDeviceToHost, c));
  CUDA_OK(cudaStreamSynchronize(c));
  CHECK(seen_by_c == 0, "stream C read %d before A wrote", seen_by_c);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(cudaEventQuery(done_a) == cudaErrorNotReady, "the event completed before its stream reached it");
  CHECK(cudaStreamQuery(b) == cudaErrorNotReady, "stream B did not wait for the event");
  gate.open();
  CUDA_OK(cudaStreamSynchronize(b));
  CHECK(cudaEventQuery(done_a) == cudaSuccess, "the event is not complete after B, which waited for it");
  const int seen = to_host(results, 1)[0];
  CHECK(seen == 1, "stream B read %d, not stream A's write", seen);
  for (cudaStream_t s : {a, b, c}) CUDA_OK(cudaStreamDestroy(s));
  CUDA_OK(cudaEventDestroy(done_a));
  return 0;
}

__global__ void busy_kernel(long long duration_ns) {
  if (threadIdx.x == 0) {
    const long long start = ptx::global_timer_ns();
    while (ptx::global_timer_ns() - start < duration_ns) {
    }
  }
  __syncthreads();
}

EMU_CASE(events) {
  Gate gate;
  cudaStream_t s;
  CUDA_OK(cudaStreamCreate(&s));
  cudaEvent_t never, start, stop, untimed;
  CUDA_OK(cudaEventCreate(&never));
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  CUDA_OK(cudaEventCreateWithFlags(&untimed, cudaEventDisableTiming));
  CHECK(cudaEventQuery(never) == cudaSuccess, "an event never recorded is complete");
  CUDA_OK(cudaEventSynchronize(never));

  EP_LAUNCH_KERNEL(gate_kernel, 1, 32, 0, s, gate.device);
  CUDA_OK(cudaEventRecord(start, s));
  EP_LAUNCH_KERNEL(busy_kernel, 1, 64, 0, s, 30 * 1000 * 1000LL);  // 30 ms
  CUDA_OK(cudaEventRecord(stop, s));
  CUDA_OK(cudaEventRecord(untimed, s));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(cudaEventQuery(start) == cudaErrorNotReady, "start completed behind a held-back kernel");
  float ms = -1;
  const cudaError_t early = cudaEventElapsedTime(&ms, start, stop);
  CHECK(early == cudaErrorNotReady, "elapsed time of pending events: %s", cudaGetErrorName(early));
  gate.open();
  CUDA_OK(cudaEventSynchronize(stop));
  CHECK(cudaEventQuery(start) == cudaSuccess && cudaEventQuery(stop) == cudaSuccess, "events done after sync");
  CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
  CHECK(ms >= 30.0f && ms < 5000.0f, "elapsed %.3f ms around a 30 ms kernel", ms);
  float back = 0;
  CUDA_OK(cudaEventElapsedTime(&back, stop, start));
  CHECK(back <= -30.0f, "elapsed from stop to start %.3f ms", back);
  CUDA_OK(cudaEventSynchronize(untimed));
  const cudaError_t no_timing = cudaEventElapsedTime(&ms, start, untimed);
  CHECK(no_timing == cudaErrorInvalidResourceHandle, "timing a DisableTiming event: %s", cudaGetErrorName(no_timing));
  CHECK(cudaGetLastError() == cudaErrorInvalidResourceHandle, "the last error");
  CHECK(cudaGetLastError() == cudaSuccess, "the last error is cleared");
  std::printf("elapsed %.3f ms\n", ms);
  CUDA_OK(cudaStreamDestroy(s));
  for (cudaEvent_t e : {never, start, stop, untimed}) CUDA_OK(cudaEventDestroy(e));
  return 0;
}

// ---- IPC handles --------------------------------------------------------------------------------------------

constexpr int kIpcCount = 16384;

__global__ void ipc_fill_kernel(int* p, int n, int mul, int add) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) p[i] = i * mul + add;
}

__global__ void ipc_check_kernel(const int* p, int n, int mul, int add, int* mismatches) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    if (p[i] != i * mul + add) atomicAdd(mismatches, 1);
}

std::string to_hex(const cudaIpcMemHandle_t& h) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < sizeof(h); ++i) {
    const auto byte = static_cast<unsigned char>(h.reserved[i]);
    s += digits[byte >> 4];
    s += digits[byte & 15];
  }
  return s;
}

bool from_hex(const char* text, cudaIpcMemHandle_t* h) {
  if (std::strlen(text) != 2 * sizeof(*h)) return false;
  for (size_t i = 0; i < sizeof(*h); ++i) {
    unsigned byte = 0;
    if (std::sscanf(text + 2 * i, "%2x", &byte) != 1) return false;
    h->reserved[i] = static_cast<char>(byte);
  }
  return true;
}

int count_mismatches(const int* p, int mul, int add) {
  int* mismatches = emu_test::device_alloc<int>(1);
  CUDA_OK(cudaMemset(mismatches, 0, sizeof(int)));
  EP_LAUNCH_KERNEL(ipc_check_kernel, 4, 128, 0, emu_test::kDefaultStream, p, kIpcCount, mul, add, mismatches);
  CUDA_OK(cudaDeviceSynchronize());
  const int bad = to_host(mismatches, 1)[0];
  CUDA_OK(cudaFree(mismatches));
  return bad;
}

// The parent: allocates and fills, opens its own handle, hands it to a child process on argv.
EMU_CASE(ipc_parent) {
  static_assert(sizeof(cudaIpcMemHandle_t) == 64, "CUDA's IPC handle is 64 bytes");
  int* p = emu_test::device_alloc<int>(kIpcCount);
  EP_LAUNCH_KERNEL(ipc_fill_kernel, 4, 128, 0, emu_test::kDefaultStream, p, kIpcCount, 3, 1);
  CUDA_OK(cudaDeviceSynchronize());
  cudaIpcMemHandle_t handle;
  CUDA_OK(cudaIpcGetMemHandle(&handle, p));

  // Opened in its own process: the same pointer back; closing it leaves the allocation alone.
  void* same = nullptr;
  CUDA_OK(cudaIpcOpenMemHandle(&same, handle, cudaIpcMemLazyEnablePeerAccess));
  CHECK(same == p, "same-process open returned %p for %p", same, static_cast<void*>(p));
  CUDA_OK(cudaIpcCloseMemHandle(same));
  CHECK(count_mismatches(p, 3, 1) == 0, "the allocation changed after a same-process open/close");

  char exe[4096];
  const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  CHECK(len > 0, "readlink /proc/self/exe");
  exe[len] = '\0';
  std::string hex = to_hex(handle);
  std::printf("handle %s\n", hex.c_str());
  std::fflush(stdout);
  char* child_argv[] = {exe, const_cast<char*>("ipc_child"), hex.data(), nullptr};
  pid_t pid;
  CHECK(posix_spawn(&pid, exe, nullptr, nullptr, child_argv, environ) == 0, "posix_spawn");
  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid, "waitpid");
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "the child failed (status %d)", status);

  const int bad = count_mismatches(p, 7, 2);
  CHECK(bad == 0, "%d of %d elements do not hold the child's writes", bad, kIpcCount);
  std::printf("parent sees the child's writes\n");
  CUDA_OK(cudaFree(p));
  return 0;
}

// The child: opens the parent's handle, checks the parent's data, writes its own.
EMU_CASE(ipc_child) {
  cudaIpcMemHandle_t handle;
  CHECK(argc > 1 && from_hex(argv[1], &handle), "ipc_child needs the handle in hex");
  void* mapped = nullptr;
  CUDA_OK(cudaIpcOpenMemHandle(&mapped, handle, cudaIpcMemLazyEnablePeerAccess));
  int* p = static_cast<int*>(mapped);
  const int bad = count_mismatches(p, 3, 1);
  CHECK(bad == 0, "the child sees %d of %d elements differ from the parent's", bad, kIpcCount);
  EP_LAUNCH_KERNEL(ipc_fill_kernel, 4, 128, 0, emu_test::kDefaultStream, p, kIpcCount, 7, 2);
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaIpcCloseMemHandle(mapped));
  std::printf("child read the parent's data and wrote its own\n");
  return 0;
}

}  // namespace
