// NVSHMEM on the emulated device (the model is described in include/nvshmem.h).
//
// Bootstrap: rank 0's unique id names a small shared page (a memfd of rank 0's process, opened by
// the others through /proc/<pid>/fd, as the runtime's IPC does). Every PE writes its slot there
// (pid, heap memfd, heap address) and maps every peer's heap; the page also carries the
// counters of host barriers and the arguments of collective calls, which are compared across
// PEs (nvshmem_malloc sizes must agree: a symmetric heap that is not symmetric is a bug).
// PEs are found by device: one per device, so ranks run as threads of one process (each on its
// own device) are PEs too, and kernels find their PE through their launch's device.
//
// Delivery: operations to peers wait in one process-wide queue. A background thread delivers
// random deliverable ones after a random delay; nvshmem_quiet delivers all of the calling PE's.
// An operation is deliverable when no operation of the same PE to the same destination issued
// before an nvshmem_fence is still waiting.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "engine.hpp"
#include "nvshmem.h"
#include "nvshmemx.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EP_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define EP_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define EP_EMU_POISON(p, n) ((void)(p), (void)(n))
#define EP_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace ep_comm {
namespace emu {
namespace nvshmem {
namespace {

constexpr uint64_t kMagic = 0x6d6873766e5f7065ull;  // "ep_nvshm"
constexpr int kMaxPes = 128;
constexpr int kMaxDevices = 64;
constexpr size_t kAlignment = 512;
constexpr size_t kFillLimit = 16u << 20;  // fresh allocations are filled with 0xA5 up to this size
constexpr uint64_t kOpMalloc = 1, kOpFree = 2;

struct PeSlot {
  std::atomic<uint32_t> joined;  // 1 once the fields below are written
  int32_t pid;
  int32_t heap_fd;
  int32_t num_pes;
  uint64_t heap_bytes;
  uint64_t heap_base;            // the heap's address in its own process
  std::atomic<uint64_t> barrier_seq;
  uint64_t op_kind, op_arg;      // the current collective call, compared across PEs
};
struct BootstrapPage {
  uint64_t magic;
  PeSlot pe[kMaxPes];
};
struct UniqueId {
  uint64_t magic;
  int32_t pid;
  int32_t fd;
};
static_assert(sizeof(UniqueId) <= sizeof(nvshmemx_uniqueid_t), "unique id must fit NVSHMEM's");

struct Pe {
  int pe = 0, num_pes = 0, device = 0;
  bool p2p = true;
  int pes_per_node = 0;  // PEs pe / pes_per_node share a node: only they map each other (nvshmem_ptr)
  BootstrapPage* page = nullptr;
  int page_fd = -1;
  char* heap = nullptr;
  size_t heap_bytes = 0;
  int heap_fd = -1;
  std::vector<char*> peer_heap;  // each PE's heap as mapped in this process
  std::vector<bool> peer_mapped;  // mapped by us (unmapped at finalize)
  uint64_t barrier_seq = 0;
  std::mutex mutex;               // guards allocations
  std::map<size_t, size_t> allocations;  // offset -> bytes
  std::atomic<uint64_t> fence_epoch{0};
};

std::atomic<Pe*> g_pe[kMaxDevices];
int g_status[kMaxDevices];
std::mutex g_host_mutex;             // initialisation and finalisation
std::vector<int> g_bootstrap_fds;   // unique ids this process created stay valid for its lifetime

std::string here(const char* file, int line) {
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
}

long long now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double timeout_s() {
  const char* t = std::getenv("EP_COMM_TIMEOUT_S");
  const double v = t != nullptr ? std::atof(t) : 0.0;
  return v > 0 ? v : 100.0;
}

bool env_true(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return false;
  std::string s(v);
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s == "1" || s == "true" || s == "yes" || s == "on" || s == "y" || s == "t";
}

// NVSHMEM_SYMMETRIC_SIZE: digits with an optional K/M/G/T suffix (powers of 1024). 0 if malformed.
size_t parse_size(const char* text) {
  if (text == nullptr || *text == '\0') return 0;
  char* end = nullptr;
  const unsigned long long n = std::strtoull(text, &end, 10);
  if (end == text) return 0;
  size_t scale = 1;
  if (*end != '\0') {
    switch (std::tolower(static_cast<unsigned char>(*end))) {
      case 'k': scale = 1ull << 10; break;
      case 'm': scale = 1ull << 20; break;
      case 'g': scale = 1ull << 30; break;
      case 't': scale = 1ull << 40; break;
      default: return 0;
    }
    if (end[1] != '\0' && !(std::tolower(static_cast<unsigned char>(end[1])) == 'b' && end[2] == '\0')) return 0;
  }
  return static_cast<size_t>(n) * scale;
}

int host_error(int status, const std::string& message) {
  std::fprintf(stderr, "ep_comm emulated NVSHMEM: %s\n", message.c_str());
  std::fflush(stderr);
  return status;
}

// A misuse inside a kernel faults the kernel (with the thread and site); on the host it is the
// device's sticky error, as an asynchronous NVSHMEM failure would be.
void misuse(const std::string& message, const char* file, int line) {
  if (kernel_device() >= 0) trap(("NVSHMEM: " + message).c_str(), file, line);
  record_device_fault("ep_comm emulated device: NVSHMEM: " + message + " at " + here(file, line));
}

Pe* current_pe() {
  const int device = current_device();
  if (device < 0 || device >= kMaxDevices) return nullptr;
  return g_pe[device].load(std::memory_order_acquire);
}

Pe& require_pe(const char* what, const char* file, int line) {
  Pe* p = current_pe();
  if (p == nullptr) {
    misuse(std::string(what) + " before NVSHMEM was initialised on device " + std::to_string(current_device()), file,
           line);
    std::fprintf(stderr, "ep_comm emulated NVSHMEM: %s outside an initialised PE\n", what);
    std::abort();
  }
  return *p;
}

// Offset of [address, address + bytes) in the PE's own heap, which must lie inside one allocation.
bool heap_offset(Pe& p, const void* address, size_t bytes, size_t* offset) {
  const char* a = static_cast<const char*>(address);
  if (a < p.heap || a + bytes > p.heap + p.heap_bytes) return false;
  const size_t off = static_cast<size_t>(a - p.heap);
  std::lock_guard<std::mutex> lock(p.mutex);
  auto it = p.allocations.upper_bound(off);
  if (it == p.allocations.begin()) return false;
  --it;
  if (off + bytes > it->first + it->second) return false;
  *offset = off;
  return true;
}

// ---- host barrier and collective-argument checks ------------------------------------------------

bool barrier(Pe& p, const char* what) {
  const uint64_t seq = ++p.barrier_seq;
  p.page->pe[p.pe].barrier_seq.store(seq, std::memory_order_release);
  const long long deadline = now_ns() + static_cast<long long>(timeout_s() * 1e9);
  for (;;) {
    std::string missing;
    for (int q = 0; q < p.num_pes; ++q)
      if (p.page->pe[q].barrier_seq.load(std::memory_order_acquire) < seq)
        missing += (missing.empty() ? "" : ", ") + std::to_string(q);
    if (missing.empty()) return true;
    if (now_ns() > deadline) {
      host_error(NVSHMEMX_ERROR_INTERNAL, "PE " + std::to_string(p.pe) + " timed out in " + what +
                                              " waiting for PEs [" + missing + "] (every PE must call it)");
      return false;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// Every PE publishes (kind, arg) of a collective call; true if all PEs agree.
bool collective_agrees(Pe& p, uint64_t kind, uint64_t arg, const char* what) {
  p.page->pe[p.pe].op_kind = kind;
  p.page->pe[p.pe].op_arg = arg;
  if (!barrier(p, what)) return false;
  bool same = true;
  std::string seen;
  for (int q = 0; q < p.num_pes; ++q) {
    const PeSlot& s = p.page->pe[q];
    same = same && s.op_kind == kind && s.op_arg == arg;
    seen += (q ? ", " : "") + std::to_string(s.op_arg);
  }
  const bool ok = barrier(p, what);  // nobody overwrites its slot before everyone compared
  if (!same)
    host_error(NVSHMEMX_ERROR_SYMMETRY, std::string(what) + " is collective with the same argument on every PE; PEs " +
                                            "passed [" + seen + "]");
  return same && ok;
}

// ---- delivery -----------------------------------------------------------------------------------

struct Op {
  int src_pe = 0, dst_pe = 0;
  uint64_t epoch = 0;          // the issuing PE's fence epoch
  char* dst = nullptr;         // in the destination's heap, as mapped here
  const char* src = nullptr;   // read at delivery
  size_t bytes = 0;
  uint64_t* signal = nullptr;  // as mapped here
  uint64_t value = 0;
  int signal_op = -1;
};

void deliver(const Op& op) {
  if (op.bytes != 0) std::memcpy(op.dst, op.src, op.bytes);
  if (op.signal != nullptr) {
    if (op.signal_op == NVSHMEM_SIGNAL_ADD)
      __atomic_fetch_add(op.signal, op.value, __ATOMIC_RELEASE);
    else
      __atomic_store_n(op.signal, op.value, __ATOMIC_RELEASE);
  }
}

struct Network {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<Op> pending;
  std::mt19937_64 rng{std::random_device{}()};
  bool started = false;
  long long max_delay_us = 100;

  // Indices of pending ops that may be delivered now (lowest fence epoch of their PE pair),
  // restricted to ops of `src_pe` (or all when -1) and `dst_pe` (or all).
  std::vector<size_t> deliverable(int src_pe, int dst_pe) {
    std::map<std::pair<int, int>, uint64_t> lowest;
    for (const Op& op : pending) {
      auto key = std::make_pair(op.src_pe, op.dst_pe);
      auto it = lowest.find(key);
      if (it == lowest.end() || op.epoch < it->second) lowest[key] = op.epoch;
    }
    std::vector<size_t> out;
    for (size_t i = 0; i < pending.size(); ++i) {
      const Op& op = pending[i];
      if ((src_pe < 0 || op.src_pe == src_pe) && (dst_pe < 0 || op.dst_pe == dst_pe) &&
          op.epoch == lowest[std::make_pair(op.src_pe, op.dst_pe)])
        out.push_back(i);
    }
    return out;
  }

  // Delivers (in random order) up to `limit` deliverable ops; returns how many.
  size_t deliver_some(int src_pe, int dst_pe, size_t limit) {
    std::vector<size_t> ready = deliverable(src_pe, dst_pe);
    std::shuffle(ready.begin(), ready.end(), rng);
    if (ready.size() > limit) ready.resize(limit);
    for (size_t i : ready) deliver(pending[i]);  // in the shuffled order
    std::sort(ready.begin(), ready.end());
    for (size_t k = ready.size(); k-- > 0;) {
      pending[ready[k]] = pending.back();
      pending.pop_back();
    }
    return ready.size();
  }

  // Delivers every op of `src_pe` (to `dst_pe` only if >= 0, and then only those before the
  // current fence epoch when `before_epoch` is set).
  void drain(int src_pe, int dst_pe = -1, uint64_t before_epoch = ~0ull) {
    std::lock_guard<std::mutex> lock(mutex);
    for (;;) {
      bool any = false;
      for (const Op& op : pending)
        if (op.src_pe == src_pe && (dst_pe < 0 || op.dst_pe == dst_pe) && op.epoch < before_epoch) any = true;
      if (!any) return;
      deliver_some(src_pe, dst_pe, ~size_t{0});
    }
  }

  void push(const Op& op) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (!started) {
        started = true;
        const char* d = std::getenv("EP_COMM_EMU_NVSHMEM_DELAY_US");
        if (d != nullptr) max_delay_us = std::atol(d);
        // A negative delay: no background delivery at all (only quiet, barriers and finalize
        // deliver), for tests that must see an operation still in flight.
        if (max_delay_us >= 0) std::thread([this] { run(); }).detach();  // lives as long as the process
      }
      pending.push_back(op);
    }
    cv.notify_one();
  }

  void run() {
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      cv.wait(lock, [this] { return !pending.empty(); });
      const long long delay = max_delay_us > 0 ? static_cast<long long>(rng() % (max_delay_us + 1)) : 0;
      lock.unlock();
      if (delay > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay));
      lock.lock();
      if (!pending.empty()) deliver_some(-1, -1, 1 + rng() % 8);
    }
  }
};

Network& network() {
  static Network* n = new Network();  // never destroyed: its thread outlives static destructors
  return *n;
}

void unmap_pe(Pe& p) {
  for (int q = 0; q < static_cast<int>(p.peer_heap.size()); ++q)
    if (p.peer_mapped[q] && p.peer_heap[q] != nullptr) munmap(p.peer_heap[q], p.heap_bytes);
  if (p.heap != nullptr) munmap(p.heap, p.heap_bytes);
  if (p.heap_fd >= 0) close(p.heap_fd);
  if (p.page != nullptr) munmap(p.page, sizeof(BootstrapPage));
  if (p.page_fd >= 0) close(p.page_fd);
}

int open_fd_of(int pid, int fd) {
  if (pid == getpid()) return dup(fd);
  const std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
  return open(path.c_str(), O_RDWR | O_CLOEXEC);
}

}  // namespace

// ---- device and host calls ------------------------------------------------------------------------

void* ptr(const void* address, int pe, const char* file, int line) {
  Pe& p = require_pe("nvshmem_ptr", file, line);
  if (pe < 0 || pe >= p.num_pes) {
    misuse("nvshmem_ptr to PE " + std::to_string(pe) + " of " + std::to_string(p.num_pes), file, line);
    return nullptr;
  }
  const char* a = static_cast<const char*>(address);
  if (a < p.heap || a >= p.heap + p.heap_bytes) return nullptr;  // not symmetric: NVSHMEM returns NULL
  if (pe != p.pe && (!p.p2p || pe / p.pes_per_node != p.pe / p.pes_per_node)) return nullptr;
  return p.peer_heap[pe] + (a - p.heap);
}

int my_pe(const char* file, int line) { return require_pe("nvshmem_my_pe", file, line).pe; }
int n_pes(const char* file, int line) { return require_pe("nvshmem_n_pes", file, line).num_pes; }

void put(void* dst, const void* src, size_t bytes, uint64_t* signal, uint64_t value, int signal_op, int pe,
         bool blocking, const char* file, int line) {
  Pe& p = require_pe("an NVSHMEM put", file, line);
  if (pe < 0 || pe >= p.num_pes) {
    misuse("put or signal to PE " + std::to_string(pe) + " of " + std::to_string(p.num_pes), file, line);
    return;
  }
  Op op;
  op.src_pe = p.pe;
  op.dst_pe = pe;
  op.epoch = p.fence_epoch.load(std::memory_order_acquire);
  op.bytes = bytes;
  op.value = value;
  op.signal_op = signal_op;
  if (bytes != 0) {
    size_t dst_off = 0, src_off = 0;
    if (!heap_offset(p, dst, bytes, &dst_off)) {
      misuse("put of " + std::to_string(bytes) + " bytes to PE " + std::to_string(pe) +
                 ": the destination is not inside one symmetric allocation",
             file, line);
      return;
    }
    if (!heap_offset(p, src, bytes, &src_off)) {
      misuse("put of " + std::to_string(bytes) + " bytes to PE " + std::to_string(pe) +
                 ": the source is not inside one symmetric allocation (a network put reads registered memory)",
             file, line);
      return;
    }
    op.dst = p.peer_heap[pe] + dst_off;
    op.src = p.heap + src_off;
  }
  if (signal != nullptr) {
    size_t off = 0;
    if (!heap_offset(p, signal, sizeof(uint64_t), &off) || off % sizeof(uint64_t) != 0) {
      misuse("signal to PE " + std::to_string(pe) + ": the signal word is not an aligned symmetric uint64_t", file,
             line);
      return;
    }
    if (signal_op != NVSHMEM_SIGNAL_SET && signal_op != NVSHMEM_SIGNAL_ADD) {
      misuse("signal operation " + std::to_string(signal_op) + " is neither NVSHMEM_SIGNAL_SET nor _ADD", file, line);
      return;
    }
    op.signal = reinterpret_cast<uint64_t*>(p.peer_heap[pe] + off);
  }
  Network& net = network();
  if (blocking) {
    // Delivered before returning, after whatever an earlier fence ordered before it.
    net.drain(p.pe, pe, op.epoch);
    std::lock_guard<std::mutex> lock(net.mutex);
    deliver(op);
    return;
  }
  net.push(op);
}

void fence(const char* file, int line) {
  Pe& p = require_pe("nvshmem_fence", file, line);
  p.fence_epoch.fetch_add(1, std::memory_order_acq_rel);
}

void quiet(const char* file, int line) {
  Pe& p = require_pe("nvshmem_quiet", file, line);
  network().drain(p.pe);
}

uint64_t signal_fetch(const uint64_t* signal, const char* file, int line) {
  if (kernel_device() >= 0) spin_point(signal, sizeof(uint64_t), "nvshmem_signal_fetch", file, line);
  return __atomic_load_n(signal, __ATOMIC_ACQUIRE);
}

uint64_t signal_wait_until(uint64_t* signal, int cmp, uint64_t value, const char* file, int line) {
  for (;;) {
    const uint64_t v = __atomic_load_n(signal, __ATOMIC_ACQUIRE);
    bool done = false;
    switch (cmp) {
      case NVSHMEM_CMP_EQ: done = v == value; break;
      case NVSHMEM_CMP_NE: done = v != value; break;
      case NVSHMEM_CMP_GT: done = v > value; break;
      case NVSHMEM_CMP_LE: done = v <= value; break;
      case NVSHMEM_CMP_LT: done = v < value; break;
      case NVSHMEM_CMP_GE: done = v >= value; break;
      default: misuse("nvshmem_signal_wait_until with comparison " + std::to_string(cmp), file, line); return v;
    }
    if (done) return v;
    if (kernel_device() >= 0)
      spin_point(signal, sizeof(uint64_t), "nvshmem_signal_wait_until", file, line);
    else
      std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

}  // namespace nvshmem
}  // namespace emu
}  // namespace ep_comm

using namespace ep_comm::emu::nvshmem;
namespace emu = ep_comm::emu;

// ---- host API ------------------------------------------------------------------------------------

int nvshmem_my_pe(const char* emu_file, int emu_line) { return my_pe(emu_file, emu_line); }
int nvshmem_n_pes(const char* emu_file, int emu_line) { return n_pes(emu_file, emu_line); }

int nvshmemx_get_uniqueid(nvshmemx_uniqueid_t* id) {
  if (id == nullptr) return NVSHMEMX_ERROR_INVALID_VALUE;
  const int fd = memfd_create("ep_emu_nvshmem_bootstrap", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, sizeof(BootstrapPage)) != 0) {
    if (fd >= 0) close(fd);
    return host_error(NVSHMEMX_ERROR_INTERNAL, std::string("cannot create the bootstrap page: ") + std::strerror(errno));
  }
  void* page = mmap(nullptr, sizeof(BootstrapPage), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (page == MAP_FAILED) {
    close(fd);
    return host_error(NVSHMEMX_ERROR_INTERNAL, "cannot map the bootstrap page");
  }
  static_cast<BootstrapPage*>(page)->magic = kMagic;  // the rest is zero (a fresh memfd)
  munmap(page, sizeof(BootstrapPage));
  {
    std::lock_guard<std::mutex> lock(g_host_mutex);
    g_bootstrap_fds.push_back(fd);
  }
  UniqueId u{kMagic, static_cast<int32_t>(getpid()), fd};
  std::memset(id, 0, sizeof(*id));
  std::memcpy(id->internal, &u, sizeof(u));
  return NVSHMEMX_SUCCESS;
}

int nvshmemx_set_attr_uniqueid_args(int rank, int nranks, const nvshmemx_uniqueid_t* id, nvshmemx_init_attr_t* attr) {
  if (attr == nullptr || id == nullptr) return NVSHMEMX_ERROR_INVALID_VALUE;
  attr->args.uid_args.myrank = rank;
  attr->args.uid_args.nranks = nranks;
  attr->args.uid_args.id = const_cast<nvshmemx_uniqueid_t*>(id);
  return NVSHMEMX_SUCCESS;
}

int nvshmemx_init_status() {
  const int device = emu::current_device();
  if (device < 0 || device >= kMaxDevices) return NVSHMEM_STATUS_NOT_INITIALIZED;
  std::lock_guard<std::mutex> lock(g_host_mutex);
  return g_status[device];
}

int nvshmemi_init_thread(int requested, int* provided, unsigned int flags, nvshmemx_init_attr_t* attr,
                         nvshmemi_version_t version) {
  (void)version;
  if (attr == nullptr || !(flags & NVSHMEMX_INIT_WITH_UNIQUEID) || attr->args.uid_args.id == nullptr)
    return host_error(NVSHMEMX_ERROR_INVALID_VALUE, "only unique-id initialisation is emulated");
  const int device = attr->args.cuda_device_id >= 0 ? attr->args.cuda_device_id : emu::current_device();
  if (device < 0 || device >= kMaxDevices) return host_error(NVSHMEMX_ERROR_INVALID_VALUE, "bad device");
  {
    // Not held while this PE waits for the others below: PEs that are threads of this process
    // initialise at the same time.
    std::lock_guard<std::mutex> lock(g_host_mutex);
    if (g_status[device] != NVSHMEM_STATUS_NOT_INITIALIZED)
      return host_error(NVSHMEMX_ERROR_INTERNAL, "NVSHMEM is already initialised (or failed to) on device " +
                                                     std::to_string(device));
    // Whatever fails from here leaves NVSHMEM "bootstrapped", as a failed real initialisation does.
    g_status[device] = NVSHMEM_STATUS_IS_BOOTSTRAPPED;
  }
  const int rank = attr->args.uid_args.myrank, nranks = attr->args.uid_args.nranks;
  if (nranks < 1 || nranks > kMaxPes || rank < 0 || rank >= nranks)
    return host_error(NVSHMEMX_ERROR_INVALID_VALUE, "PE " + std::to_string(rank) + " of " + std::to_string(nranks) +
                                                        " (the emulator supports 1 to " + std::to_string(kMaxPes) +
                                                        " PEs)");
  UniqueId u;
  std::memcpy(&u, attr->args.uid_args.id->internal, sizeof(u));
  if (u.magic != kMagic) return host_error(NVSHMEMX_ERROR_INVALID_VALUE, "not a unique id of the emulated NVSHMEM");
  const char* size_text = std::getenv("NVSHMEM_SYMMETRIC_SIZE");
  const size_t heap_bytes = size_text != nullptr ? parse_size(size_text) : (size_t{1} << 30);
  if (heap_bytes == 0)
    return host_error(NVSHMEMX_ERROR_INVALID_VALUE,
                      std::string("NVSHMEM_SYMMETRIC_SIZE=") + size_text + " is not a size (digits, optional K/M/G/T)");

  auto p = std::make_unique<Pe>();
  p->pe = rank;
  p->num_pes = nranks;
  p->device = device;
  p->p2p = !env_true("NVSHMEM_DISABLE_P2P");
  // Emulated nodes: EP_COMM_RANKS_PER_NODE PEs per node (ep_comm's own setting; all PEs by default).
  p->pes_per_node = nranks;
  if (const char* per_node = std::getenv("EP_COMM_RANKS_PER_NODE"); per_node != nullptr && *per_node != '\0') {
    const int n = std::atoi(per_node);
    if (n < 1 || nranks % n != 0)
      return host_error(NVSHMEMX_ERROR_INVALID_VALUE, std::string("EP_COMM_RANKS_PER_NODE=") + per_node +
                                                          " must be a positive divisor of the " +
                                                          std::to_string(nranks) + " PEs");
    p->pes_per_node = n;
  }
  auto fail = [&](int status, const std::string& message) {
    unmap_pe(*p);
    return host_error(status, "PE " + std::to_string(rank) + ": " + message);
  };
  p->page_fd = open_fd_of(u.pid, u.fd);
  if (p->page_fd < 0) return fail(NVSHMEMX_ERROR_INTERNAL, "cannot open the bootstrap page of process " +
                                                               std::to_string(u.pid) + ": " + std::strerror(errno));
  void* page = mmap(nullptr, sizeof(BootstrapPage), PROT_READ | PROT_WRITE, MAP_SHARED, p->page_fd, 0);
  if (page == MAP_FAILED) return fail(NVSHMEMX_ERROR_INTERNAL, "cannot map the bootstrap page");
  p->page = static_cast<BootstrapPage*>(page);
  PeSlot& mine = p->page->pe[rank];
  if (mine.joined.load(std::memory_order_acquire) != 0)
    return fail(NVSHMEMX_ERROR_INVALID_VALUE, "another PE already joined as PE " + std::to_string(rank));

  p->heap_bytes = (heap_bytes + 4095) / 4096 * 4096;
  p->heap_fd = memfd_create("ep_emu_nvshmem_heap", MFD_CLOEXEC);
  if (p->heap_fd < 0 || ftruncate(p->heap_fd, static_cast<off_t>(p->heap_bytes)) != 0)
    return fail(NVSHMEMX_ERROR_OUT_OF_MEMORY, "cannot create a symmetric heap of " + std::to_string(p->heap_bytes) +
                                                  " bytes");
  void* heap = mmap(nullptr, p->heap_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, p->heap_fd, 0);
  if (heap == MAP_FAILED) return fail(NVSHMEMX_ERROR_OUT_OF_MEMORY, "cannot map the symmetric heap");
  p->heap = static_cast<char*>(heap);
  EP_EMU_POISON(p->heap, p->heap_bytes);  // unallocated heap is off limits

  mine.pid = getpid();
  mine.heap_fd = p->heap_fd;
  mine.num_pes = nranks;
  mine.heap_bytes = p->heap_bytes;
  mine.heap_base = reinterpret_cast<uint64_t>(p->heap);
  mine.joined.store(1, std::memory_order_release);

  // Wait for every PE to join.
  const long long deadline = now_ns() + static_cast<long long>(timeout_s() * 1e9);
  for (;;) {
    std::string missing;
    for (int q = 0; q < nranks; ++q)
      if (p->page->pe[q].joined.load(std::memory_order_acquire) == 0)
        missing += (missing.empty() ? "" : ", ") + std::to_string(q);
    if (missing.empty()) break;
    if (now_ns() > deadline)
      return fail(NVSHMEMX_ERROR_INTERNAL, "timed out in initialisation waiting for PEs [" + missing + "] to join");
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  for (int q = 0; q < nranks; ++q) {
    const PeSlot& s = p->page->pe[q];
    if (s.num_pes != nranks || s.heap_bytes != p->heap_bytes)
      return fail(NVSHMEMX_ERROR_INVALID_VALUE, "PE " + std::to_string(q) + " joined with " +
                                                    std::to_string(s.num_pes) + " PEs and a heap of " +
                                                    std::to_string(s.heap_bytes) + " bytes, this PE with " +
                                                    std::to_string(nranks) + " and " + std::to_string(p->heap_bytes));
  }
  p->peer_heap.assign(nranks, nullptr);
  p->peer_mapped.assign(nranks, false);
  for (int q = 0; q < nranks; ++q) {
    const PeSlot& s = p->page->pe[q];
    if (q == rank) {
      p->peer_heap[q] = p->heap;
    } else if (s.pid == getpid()) {
      p->peer_heap[q] = reinterpret_cast<char*>(s.heap_base);  // a PE of this process: the same address
    } else {
      const int fd = open_fd_of(s.pid, s.heap_fd);
      void* m = fd >= 0 ? mmap(nullptr, p->heap_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
      if (fd >= 0) close(fd);
      if (m == MAP_FAILED)
        return fail(NVSHMEMX_ERROR_INTERNAL, "cannot map the heap of PE " + std::to_string(q) + " (process " +
                                                 std::to_string(s.pid) + ")");
      p->peer_heap[q] = static_cast<char*>(m);
      p->peer_mapped[q] = true;
    }
  }
  if (!barrier(*p, "initialisation")) return fail(NVSHMEMX_ERROR_INTERNAL, "initialisation barrier failed");
  if (provided != nullptr) *provided = requested;
  std::lock_guard<std::mutex> lock(g_host_mutex);
  g_pe[device].store(p.release(), std::memory_order_release);
  g_status[device] = NVSHMEM_STATUS_IS_INITIALIZED;
  return NVSHMEMX_SUCCESS;
}

void* nvshmem_malloc(size_t bytes) {
  Pe& p = require_pe("nvshmem_malloc", __FILE__, __LINE__);
  if (!collective_agrees(p, kOpMalloc, bytes, "nvshmem_malloc")) return nullptr;
  if (bytes == 0) return nullptr;
  const size_t want = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  size_t offset = 0;
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    for (const auto& [off, size] : p.allocations) {
      if (off - offset >= want) break;
      offset = (off + size + kAlignment - 1) / kAlignment * kAlignment;
    }
    found = offset + want <= p.heap_bytes;
    if (found) p.allocations[offset] = bytes;
  }
  if (!found) {
    host_error(NVSHMEMX_ERROR_OUT_OF_MEMORY, "nvshmem_malloc of " + std::to_string(bytes) +
                                                 " bytes does not fit the symmetric heap of " +
                                                 std::to_string(p.heap_bytes) + " bytes (NVSHMEM_SYMMETRIC_SIZE)");
    return nullptr;
  }
  char* out = p.heap + offset;
  EP_EMU_UNPOISON(out, bytes);
  std::memset(out, 0xA5, std::min(bytes, kFillLimit));  // NVSHMEM does not zero: neither do we
  if (!barrier(p, "nvshmem_malloc")) return nullptr;   // peers may write once everyone has it
  return out;
}

void nvshmem_free(void* address) {
  Pe& p = require_pe("nvshmem_free", __FILE__, __LINE__);
  const char* a = static_cast<const char*>(address);
  const uint64_t offset = a != nullptr && a >= p.heap && a < p.heap + p.heap_bytes ? a - p.heap : ~0ull;
  network().drain(p.pe);
  if (!collective_agrees(p, kOpFree, offset, "nvshmem_free")) return;
  if (address == nullptr) return;
  std::lock_guard<std::mutex> lock(p.mutex);
  auto it = p.allocations.find(offset);
  if (it == p.allocations.end()) {
    host_error(NVSHMEMX_ERROR_INVALID_VALUE, "nvshmem_free of a pointer nvshmem_malloc did not return");
    return;
  }
  EP_EMU_POISON(p.heap + it->first, it->second);
  p.allocations.erase(it);
}

void nvshmem_barrier_all() {
  Pe& p = require_pe("nvshmem_barrier_all", __FILE__, __LINE__);
  network().drain(p.pe);  // a barrier completes the PE's outstanding operations
  barrier(p, "nvshmem_barrier_all");
}

void nvshmem_finalize() {
  Pe* p = current_pe();
  if (p == nullptr) return;
  network().drain(p->pe);
  barrier(*p, "nvshmem_finalize");
  std::lock_guard<std::mutex> lock(g_host_mutex);
  g_pe[p->device].store(nullptr, std::memory_order_release);
  g_status[p->device] = NVSHMEM_STATUS_NOT_INITIALIZED;
  EP_EMU_UNPOISON(p->heap, p->heap_bytes);
  unmap_pe(*p);
  delete p;
}
