// The emulated device's CUDA runtime: devices, memory, IPC handles, streams, events and errors
// (the declarations are include/cuda_runtime_api.h). Kernels run through scheduler.cpp.
//
// Memory: device allocations are memfd-backed shared mappings placed so that the allocation ends
// at a PROT_NONE guard page (an overrun faults; under ASan the slack is poisoned too). An IPC
// handle names the memfd by process and descriptor; a peer process maps /proc/<pid>/fd/<fd>, the
// same process gets the original pointer back (so TSan sees ranks run as threads touch the same
// addresses). Mapped host memory is ordinary heap memory, its device pointer the host pointer.
//
// Streams: one worker thread per stream runs its operations in order. A kernel fault (deadlock,
// divergent warp collective, barrier mismatch, trap, hang) is sticky for the process, as a fault is
// for a CUDA context: every later synchronisation returns cudaErrorLaunchFailure, whose text is the
// fault's report.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "cuda_runtime_api.h"
#include "emulator/engine.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define EP_EMU_RT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EP_EMU_RT_ASAN 1
#endif
#endif
#ifdef EP_EMU_RT_ASAN
#include <sanitizer/asan_interface.h>
#define EP_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define EP_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define EP_EMU_POISON(p, n) ((void)(p), (void)(n))
#define EP_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

// Opaque handle types of the runtime API, defined here.
struct EpEmuStream;
struct EpEmuEvent;

namespace ep_comm {
namespace emu {
namespace {

constexpr size_t kAllocAlign = 256;          // cudaMalloc's alignment guarantee
constexpr size_t kDefaultSharedBytes = 48 * 1024;
constexpr size_t kOptinSharedBytes = 227 * 1024;  // H100
constexpr size_t kFillLimit = 16u << 20;     // fill new allocations up to this size with garbage

long long monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  return std::atoi(v);
}

size_t page_bytes() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// ---- errors --------------------------------------------------------------------------------------

thread_local cudaError_t t_last_error = cudaSuccess;

struct Sticky {
  std::atomic<bool> set{false};
  std::mutex mutex;
  std::string message;  // written once, before `set`
};
Sticky& sticky() {
  static Sticky* s = new Sticky();  // never destroyed: streams may fault during exit
  return *s;
}

void record_fault(const std::string& message) {
  Sticky& s = sticky();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.set.load()) return;
  s.message = message;
  s.set.store(true, std::memory_order_release);
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
}

cudaError_t fail(cudaError_t e) {
  t_last_error = e;
  return e;
}

cudaError_t sticky_status() { return sticky().set.load(std::memory_order_acquire) ? cudaErrorLaunchFailure : cudaSuccess; }

// ---- devices -------------------------------------------------------------------------------------

int num_devices() {
  static const int n = std::max(1, env_int("EP_COMM_EMU_NUM_DEVICES", 8));
  return n;
}
int num_sms() {
  static const int n = std::max(1, env_int("EP_COMM_EMU_NUM_SMS", 132));
  return n;
}
thread_local int t_device = 0;

}  // namespace
}  // namespace emu
}  // namespace ep_comm

// ---- streams and events --------------------------------------------------------------------------

struct EpEmuStream {
  int device = 0;
  std::mutex mutex;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  unsigned long long submitted = 0, completed = 0;
  bool stopping = false;
  std::thread worker;

  explicit EpEmuStream(int dev) : device(dev) { worker = std::thread([this] { run(); }); }

  void run() {
    for (;;) {
      std::function<void()> op;
      {
        std::unique_lock<std::mutex> lock(mutex);
        cv.wait(lock, [this] { return stopping || !queue.empty(); });
        if (queue.empty()) return;
        op = std::move(queue.front());
        queue.pop_front();
      }
      op();
      {
        std::lock_guard<std::mutex> lock(mutex);
        ++completed;
      }
      cv.notify_all();
    }
  }
  void push(std::function<void()> op) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      queue.push_back(std::move(op));
      ++submitted;
    }
    cv.notify_all();
  }
  void wait_idle() {
    std::unique_lock<std::mutex> lock(mutex);
    const unsigned long long target = submitted;
    cv.wait(lock, [&] { return completed >= target; });
  }
  bool idle() {
    std::lock_guard<std::mutex> lock(mutex);
    return completed >= submitted;
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stopping = true;
    }
    cv.notify_all();
    worker.join();
  }
};

// One recording of an event: done once the stream reaches it.
struct EpEmuMark {
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  long long time_ns = 0;
  void complete() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      done = true;
      time_ns = ep_comm::emu::monotonic_ns();
    }
    cv.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [this] { return done; });
  }
};

struct EpEmuEvent {
  std::mutex mutex;
  std::shared_ptr<EpEmuMark> mark;  // null: never recorded (complete, as in CUDA)
  bool timing = true;
};

namespace ep_comm {
namespace emu {
namespace {

struct Streams {
  std::mutex mutex;
  std::set<EpEmuStream*> all;
  std::map<int, EpEmuStream*> defaults;
};
Streams& streams() {
  static Streams* s = new Streams();  // never destroyed: stream workers outlive static destructors
  return *s;
}

EpEmuStream* resolve(cudaStream_t stream) {
  if (stream != nullptr && stream != cudaStreamLegacy && stream != cudaStreamPerThread) return stream;
  Streams& s = streams();
  std::lock_guard<std::mutex> lock(s.mutex);
  EpEmuStream*& d = s.defaults[t_device];
  if (d == nullptr) {
    d = new EpEmuStream(t_device);
    s.all.insert(d);
  }
  return d;
}

bool known_stream(cudaStream_t stream) {
  if (stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread) return true;
  Streams& s = streams();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.all.count(stream) != 0;
}

// Waits for the streams of the calling thread's current device, as CUDA's device-wide waits do
// (ranks run as threads of one process each have their own device and must not wait for each other).
void synchronize_device() {
  const int device = t_device;
  std::vector<EpEmuStream*> list;
  {
    Streams& s = streams();
    std::lock_guard<std::mutex> lock(s.mutex);
    for (EpEmuStream* st : s.all)
      if (st->device == device) list.push_back(st);
  }
  for (EpEmuStream* st : list) st->wait_idle();
}

// ---- memory --------------------------------------------------------------------------------------

struct Mapping {
  char* base = nullptr;  // start of the mapping (the guard page follows base + bytes)
  size_t bytes = 0;      // mapped bytes, a whole number of pages
  size_t offset = 0;     // the allocation's pointer is base + offset
  size_t size = 0;       // the allocation's size
  int fd = -1;           // the memfd (own allocations only)
  int refs = 0;          // IPC opens in this process
  bool own = false;
};

struct Memory {
  std::mutex mutex;
  std::unordered_map<void*, Mapping> by_ptr;  // device allocations and opened IPC mappings
  std::set<void*> host;                       // cudaHostAlloc'd
};
Memory& memory() {
  static Memory* m = new Memory();
  return *m;
}

// The cudaMalloc'd allocation that starts at `ptr` (false for anything else); `forget` removes it.
bool find_own_allocation(void* ptr, Mapping* out, bool forget) {
  Memory& mem = memory();
  std::lock_guard<std::mutex> lock(mem.mutex);
  auto it = mem.by_ptr.find(ptr);
  if (it == mem.by_ptr.end() || !it->second.own) return false;
  *out = it->second;
  if (forget) mem.by_ptr.erase(it);
  return true;
}

// Maps `bytes` (page multiple) from `fd` followed by a guard page. nullptr on failure.
char* map_with_guard(int fd, size_t bytes) {
  const size_t page = page_bytes();
  void* reserve = mmap(nullptr, bytes + page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserve == MAP_FAILED) return nullptr;
  void* mapped = mmap(reserve, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
  if (mapped == MAP_FAILED) {
    munmap(reserve, bytes + page);
    return nullptr;
  }
  return static_cast<char*>(mapped);
}

void poison_slack(const Mapping& m) {
  EP_EMU_POISON(m.base, m.offset);
  EP_EMU_POISON(m.base + m.offset + m.size, m.bytes - m.offset - m.size);
}
void unmap(const Mapping& m) {
  EP_EMU_UNPOISON(m.base, m.bytes);
  munmap(m.base, m.bytes + page_bytes());
}

// The IPC handle's contents (64 bytes, as CUDA's).
struct IpcPayload {
  char magic[8];
  int64_t pid;
  int32_t fd;
  int32_t pad;
  uint64_t bytes, offset, size;
  char unused[16];
};
static_assert(sizeof(IpcPayload) == sizeof(cudaIpcMemHandle_t), "IPC payload must fill the handle");
constexpr char kIpcMagic[8] = {'E', 'P', 'E', 'M', 'U', 'I', 'P', 'C'};

// ---- kernel limits set through cudaFuncSetAttribute ------------------------------------------------

struct FuncLimits {
  std::mutex mutex;
  std::unordered_map<const void*, size_t> max_dynamic_shared;
};
FuncLimits& func_limits() {
  static FuncLimits* f = new FuncLimits();
  return *f;
}

long long hang_limit_ns() {
  const char* v = std::getenv("EP_COMM_EMU_HANG_S");
  double s = v != nullptr && *v != '\0' ? std::atof(v) : 0.0;
  if (s <= 0.0) {
    // Longer than the kernels' own timeout (EP_COMM_TIMEOUT_S, 100 s by default), so that a wait
    // the kernel bounds itself ends in the kernel's error, naming rank, phase and peer.
    const char* t = std::getenv("EP_COMM_TIMEOUT_S");
    s = (t != nullptr && *t != '\0' ? std::atof(t) : 100.0) + 30.0;
  }
  return static_cast<long long>(s * 1e9);
}

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

}  // namespace

void enqueue_kernel(const char* name, const void* function, dim3 grid, dim3 block, size_t shared_bytes, void* stream,
                    KernelBody body) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  size_t shared_limit = kDefaultSharedBytes;
  {
    FuncLimits& f = func_limits();
    std::lock_guard<std::mutex> lock(f.mutex);
    auto it = f.max_dynamic_shared.find(function);
    if (it != f.max_dynamic_shared.end()) shared_limit = std::max(shared_limit, it->second);
  }
  const bool bad_grid = grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535;
  const bool bad_block = threads == 0 || threads > 1024 || block.z > 64;
  if (bad_grid || bad_block || shared_bytes > shared_limit) {
    std::fprintf(stderr,
                 "ep_comm emulated device: launch of %s refused: grid %s, block %s, %zu bytes of dynamic shared "
                 "memory (limit %zu for this kernel)\n",
                 name, dims(grid).c_str(), dims(block).c_str(), shared_bytes, shared_limit);
    fail(cudaErrorInvalidConfiguration);
    return;
  }
  if (!known_stream(static_cast<cudaStream_t>(stream))) {
    fail(cudaErrorInvalidResourceHandle);
    return;
  }
  auto launch = std::make_shared<LaunchState>();
  launch->name = name;
  launch->grid = grid;
  launch->block = block;
  launch->shared_bytes = shared_bytes;
  launch->body = std::move(body);
  launch->hang_ns = hang_limit_ns();
  EpEmuStream* target = resolve(static_cast<cudaStream_t>(stream));
  launch->device = target->device;
  target->push([launch] {
    if (sticky().set.load(std::memory_order_acquire)) return;  // a faulted context runs nothing more
    run_grid(launch.get());
    if (launch->aborted()) record_fault(launch->error());
  });
}

int current_device() {
  const int device = kernel_device();
  return device >= 0 ? device : t_device;
}

void record_device_fault(const std::string& message) { record_fault(message); }

}  // namespace emu
}  // namespace ep_comm

using namespace ep_comm::emu;

// ---- errors ------------------------------------------------------------------------------------------

const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorStubLibrary: return "cudaErrorStubLibrary";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorPeerAccessAlreadyEnabled: return "cudaErrorPeerAccessAlreadyEnabled";
    case cudaErrorMapBufferObjectFailed: return "cudaErrorMapBufferObjectFailed";
    case cudaErrorUnknown: return "cudaErrorUnknown";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorMapBufferObjectFailed: return "mapping of buffer object failed";
    case cudaErrorLaunchFailure: {
      Sticky& s = sticky();
      // The fault's report (written once, before `set`, never changed after).
      if (s.set.load(std::memory_order_acquire)) return s.message.c_str();
      return "unspecified launch failure";
    }
    default: return cudaGetErrorName(error);
  }
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e != cudaSuccess ? e : sticky_status();
}
cudaError_t cudaPeekAtLastError() { return t_last_error != cudaSuccess ? t_last_error : sticky_status(); }
cudaError_t cudaDriverGetVersion(int* version) {
  if (version == nullptr) return fail(cudaErrorInvalidValue);
  *version = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* version) { return cudaDriverGetVersion(version); }

// ---- devices ------------------------------------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return fail(cudaErrorInvalidValue);
  *count = num_devices();
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= num_devices()) return fail(cudaErrorInvalidDevice);
  t_device = device;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return fail(cudaErrorInvalidValue);
  *device = t_device;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (prop == nullptr) return fail(cudaErrorInvalidValue);
  if (device < 0 || device >= num_devices()) return fail(cudaErrorInvalidDevice);
  std::memset(prop, 0, sizeof(*prop));
  std::snprintf(prop->name, sizeof(prop->name), "ep_comm emulated device");
  prop->totalGlobalMem = 80ull << 30;
  prop->sharedMemPerBlock = kDefaultSharedBytes;
  prop->sharedMemPerBlockOptin = kOptinSharedBytes;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->multiProcessorCount = num_sms();
  prop->major = 9;
  prop->minor = 0;
  prop->pciBusID = device;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr) return fail(cudaErrorInvalidValue);
  if (device < 0 || device >= num_devices()) return fail(cudaErrorInvalidDevice);
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = num_sms(); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(kOptinSharedBytes); return cudaSuccess;
  }
  return fail(cudaErrorInvalidValue);
}
cudaError_t cudaDeviceSynchronize() {
  synchronize_device();
  return sticky_status();
}
cudaError_t cudaDeviceCanAccessPeer(int* can_access, int device, int peer_device) {
  if (can_access == nullptr) return fail(cudaErrorInvalidValue);
  if (device < 0 || device >= num_devices() || peer_device < 0 || peer_device >= num_devices())
    return fail(cudaErrorInvalidDevice);
  *can_access = device != peer_device;
  return cudaSuccess;
}
cudaError_t cudaDeviceEnablePeerAccess(int peer_device, unsigned int flags) {
  (void)flags;
  if (peer_device < 0 || peer_device >= num_devices()) return fail(cudaErrorInvalidDevice);
  return cudaSuccess;
}

cudaError_t ep_emu_func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (func == nullptr || attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return fail(cudaErrorInvalidValue);
  if (value < 0 || static_cast<size_t>(value) > kOptinSharedBytes) return fail(cudaErrorInvalidValue);
  FuncLimits& f = func_limits();
  std::lock_guard<std::mutex> lock(f.mutex);
  f.max_dynamic_shared[func] = static_cast<size_t>(value);
  return cudaSuccess;
}

// ---- memory ------------------------------------------------------------------------------------------

cudaError_t cudaMalloc(void** ptr, size_t size) {
  if (ptr == nullptr) return fail(cudaErrorInvalidValue);
  *ptr = nullptr;
  if (size == 0) return cudaSuccess;
  if (sticky_status() != cudaSuccess) return fail(sticky_status());
  const size_t aligned = round_up(size, kAllocAlign);
  const size_t bytes = round_up(aligned, page_bytes());
  // Close-on-exec: processes this one spawns must not hold its device memory (peers open it by
  // /proc/<pid>/fd, which does not need the descriptor inherited).
  const int fd = static_cast<int>(syscall(SYS_memfd_create, "ep_comm_emu_device", 1u /* MFD_CLOEXEC */));
  if (fd < 0) return fail(cudaErrorMemoryAllocation);
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    close(fd);
    return fail(cudaErrorMemoryAllocation);
  }
  char* base = map_with_guard(fd, bytes);
  if (base == nullptr) {
    close(fd);
    return fail(cudaErrorMemoryAllocation);
  }
  Mapping m;
  m.base = base;
  m.bytes = bytes;
  m.offset = bytes - aligned;  // the allocation ends where the guard page begins
  m.size = size;
  m.fd = fd;
  m.own = true;
  // Device memory starts as garbage on a GPU: code that reads before writing must not see zeros.
  if (size <= kFillLimit) std::memset(base + m.offset, 0xA5, size);
  poison_slack(m);
  void* p = base + m.offset;
  {
    Memory& mem = memory();
    std::lock_guard<std::mutex> lock(mem.mutex);
    mem.by_ptr[p] = m;
  }
  *ptr = p;
  return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  synchronize_device();  // cudaFree waits for the device, as CUDA's does
  Mapping m;
  if (!find_own_allocation(ptr, &m, /*forget=*/true)) return fail(cudaErrorInvalidDevicePointer);
  unmap(m);
  close(m.fd);
  return cudaSuccess;
}

cudaError_t cudaHostAlloc(void** ptr, size_t size, unsigned int flags) {
  (void)flags;
  if (ptr == nullptr) return fail(cudaErrorInvalidValue);
  void* p = std::aligned_alloc(kAllocAlign, round_up(std::max<size_t>(size, 1), kAllocAlign));
  if (p == nullptr) return fail(cudaErrorMemoryAllocation);
  {
    Memory& mem = memory();
    std::lock_guard<std::mutex> lock(mem.mutex);
    mem.host.insert(p);
  }
  *ptr = p;
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** ptr, size_t size) { return cudaHostAlloc(ptr, size, cudaHostAllocDefault); }
cudaError_t cudaFreeHost(void* ptr) {
  if (ptr == nullptr) return cudaSuccess;
  {
    Memory& mem = memory();
    std::lock_guard<std::mutex> lock(mem.mutex);
    if (mem.host.erase(ptr) == 0) return fail(cudaErrorInvalidValue);
  }
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaHostGetDevicePointer(void** device_ptr, void* host_ptr, unsigned int flags) {
  (void)flags;
  if (device_ptr == nullptr || host_ptr == nullptr) return fail(cudaErrorInvalidValue);
  *device_ptr = host_ptr;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  if (ptr == nullptr) return fail(cudaErrorInvalidValue);
  if (!known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  resolve(stream)->push([ptr, value, count] { std::memset(ptr, value, count); });
  return cudaSuccess;
}
cudaError_t cudaMemset(void* ptr, int value, size_t count) {
  synchronize_device();
  if (sticky_status() != cudaSuccess) return sticky_status();  // a faulted context copies nothing
  if (count != 0 && ptr == nullptr) return fail(cudaErrorInvalidValue);
  if (count != 0) std::memset(ptr, value, count);
  return sticky_status();
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind, cudaStream_t stream) {
  (void)kind;
  if (count == 0) return cudaSuccess;
  if (dst == nullptr || src == nullptr) return fail(cudaErrorInvalidValue);
  if (!known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  resolve(stream)->push([dst, src, count] { std::memmove(dst, src, count); });
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  (void)kind;
  synchronize_device();
  if (sticky_status() != cudaSuccess) return sticky_status();  // a faulted context copies nothing
  if (count != 0 && (dst == nullptr || src == nullptr)) return fail(cudaErrorInvalidValue);
  if (count != 0) std::memmove(dst, src, count);
  return sticky_status();
}

// ---- IPC ----------------------------------------------------------------------------------------------------

cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* handle, void* ptr) {
  if (handle == nullptr || ptr == nullptr) return fail(cudaErrorInvalidValue);
  Mapping m;
  if (!find_own_allocation(ptr, &m, /*forget=*/false)) return fail(cudaErrorInvalidDevicePointer);
  IpcPayload p{};
  std::memcpy(p.magic, kIpcMagic, sizeof(kIpcMagic));
  p.pid = getpid();
  p.fd = m.fd;
  p.bytes = m.bytes;
  p.offset = m.offset;
  p.size = m.size;
  std::memset(handle, 0, sizeof(*handle));
  std::memcpy(handle, &p, sizeof(p));
  return cudaSuccess;
}

cudaError_t cudaIpcOpenMemHandle(void** ptr, cudaIpcMemHandle_t handle, unsigned int flags) {
  (void)flags;
  if (ptr == nullptr) return fail(cudaErrorInvalidValue);
  IpcPayload p;
  std::memcpy(&p, &handle, sizeof(p));
  if (std::memcmp(p.magic, kIpcMagic, sizeof(kIpcMagic)) != 0) return fail(cudaErrorInvalidValue);
  Memory& mem = memory();
  if (p.pid == getpid()) {
    // Ranks run as threads of one process: the same addresses, so sanitizers see their sharing.
    std::lock_guard<std::mutex> lock(mem.mutex);
    for (auto& [addr, m] : mem.by_ptr)
      if (m.own && m.fd == p.fd) {
        ++m.refs;
        *ptr = addr;
        return cudaSuccess;
      }
    return fail(cudaErrorInvalidValue);
  }
  const std::string path = "/proc/" + std::to_string(p.pid) + "/fd/" + std::to_string(p.fd);
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    std::fprintf(stderr, "ep_comm emulated device: cannot open %s (%s): the peer process is gone, or this "
                 "container forbids /proc/<pid>/fd access between processes\n", path.c_str(), std::strerror(errno));
    return fail(cudaErrorMapBufferObjectFailed);
  }
  char* base = map_with_guard(fd, p.bytes);
  close(fd);  // the mapping keeps the memory
  if (base == nullptr) return fail(cudaErrorMapBufferObjectFailed);
  Mapping m;
  m.base = base;
  m.bytes = p.bytes;
  m.offset = p.offset;
  m.size = p.size;
  m.refs = 1;
  poison_slack(m);
  void* addr = base + m.offset;
  std::lock_guard<std::mutex> lock(mem.mutex);
  mem.by_ptr[addr] = m;
  *ptr = addr;
  return cudaSuccess;
}

cudaError_t cudaIpcCloseMemHandle(void* ptr) {
  Memory& mem = memory();
  Mapping m;
  {
    std::lock_guard<std::mutex> lock(mem.mutex);
    auto it = mem.by_ptr.find(ptr);
    if (it == mem.by_ptr.end() || it->second.refs <= 0) return fail(cudaErrorInvalidValue);
    if (it->second.own) {  // opened in its own process: just drop the reference
      --it->second.refs;
      return cudaSuccess;
    }
    m = it->second;
    mem.by_ptr.erase(it);
  }
  unmap(m);
  return cudaSuccess;
}

// ---- streams -------------------------------------------------------------------------------------------------

cudaError_t cudaStreamCreateWithPriority(cudaStream_t* stream, unsigned int flags, int priority) {
  (void)flags;
  (void)priority;
  if (stream == nullptr) return fail(cudaErrorInvalidValue);
  auto* s = new EpEmuStream(t_device);
  Streams& all = streams();
  std::lock_guard<std::mutex> lock(all.mutex);
  all.all.insert(s);
  *stream = s;
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int flags) {
  return cudaStreamCreateWithPriority(stream, flags, 0);
}
cudaError_t cudaStreamCreate(cudaStream_t* stream) { return cudaStreamCreateWithPriority(stream, 0, 0); }
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  if (stream == nullptr || stream == cudaStreamLegacy || stream == cudaStreamPerThread)
    return fail(cudaErrorInvalidResourceHandle);
  {
    Streams& all = streams();
    std::lock_guard<std::mutex> lock(all.mutex);
    if (all.all.erase(stream) == 0) return fail(cudaErrorInvalidResourceHandle);
  }
  stream->wait_idle();  // CUDA finishes the stream's work before releasing it
  stream->stop();
  delete stream;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  if (!known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  resolve(stream)->wait_idle();
  return sticky_status();
}
cudaError_t cudaStreamQuery(cudaStream_t stream) {
  if (!known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  if (sticky_status() != cudaSuccess) return sticky_status();
  return resolve(stream)->idle() ? cudaSuccess : cudaErrorNotReady;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
  (void)flags;
  if (event == nullptr || !known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  std::shared_ptr<EpEmuMark> mark;
  {
    std::lock_guard<std::mutex> lock(event->mutex);
    mark = event->mark;
  }
  if (mark) resolve(stream)->push([mark] { mark->wait(); });
  return cudaSuccess;
}

// ---- events ---------------------------------------------------------------------------------------------------

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  if (event == nullptr) return fail(cudaErrorInvalidValue);
  auto* e = new EpEmuEvent();
  e->timing = (flags & cudaEventDisableTiming) == 0;
  *event = e;
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* event) { return cudaEventCreateWithFlags(event, cudaEventDefault); }
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (event == nullptr) return fail(cudaErrorInvalidResourceHandle);
  delete event;  // a pending recording keeps its mark alive through the stream's shared_ptr
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (event == nullptr || !known_stream(stream)) return fail(cudaErrorInvalidResourceHandle);
  auto mark = std::make_shared<EpEmuMark>();
  {
    std::lock_guard<std::mutex> lock(event->mutex);
    event->mark = mark;
  }
  resolve(stream)->push([mark] { mark->complete(); });
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  if (event == nullptr) return fail(cudaErrorInvalidResourceHandle);
  std::shared_ptr<EpEmuMark> mark;
  {
    std::lock_guard<std::mutex> lock(event->mutex);
    mark = event->mark;
  }
  if (mark) mark->wait();
  return sticky_status();
}
cudaError_t cudaEventQuery(cudaEvent_t event) {
  if (event == nullptr) return fail(cudaErrorInvalidResourceHandle);
  std::shared_ptr<EpEmuMark> mark;
  {
    std::lock_guard<std::mutex> lock(event->mutex);
    mark = event->mark;
  }
  if (!mark) return cudaSuccess;
  std::lock_guard<std::mutex> lock(mark->mutex);
  return mark->done ? cudaSuccess : cudaErrorNotReady;
}
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (ms == nullptr) return fail(cudaErrorInvalidValue);
  if (start == nullptr || end == nullptr || !start->timing || !end->timing) return fail(cudaErrorInvalidResourceHandle);
  std::shared_ptr<EpEmuMark> a, b;
  {
    std::lock_guard<std::mutex> lock(start->mutex);
    a = start->mark;
  }
  {
    std::lock_guard<std::mutex> lock(end->mutex);
    b = end->mark;
  }
  if (!a || !b) return fail(cudaErrorInvalidResourceHandle);
  std::lock_guard<std::mutex> la(a->mutex);
  if (!a->done) return cudaErrorNotReady;
  const long long t0 = a->time_ns;
  std::lock_guard<std::mutex> lb(b->mutex);
  if (!b->done) return cudaErrorNotReady;
  *ms = static_cast<float>((b->time_ns - t0) / 1e6);
  return cudaSuccess;
}
