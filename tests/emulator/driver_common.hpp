// What the in-process multi-rank drivers in tests/emulator share (intranode_driver.cpp,
// low_latency_driver.cpp, internode_driver.cpp): seeded random numbers, bf16 rounding, a host
// barrier, device memory that ends at the emulator's guard page, bit-exact comparison that prints
// MISMATCH lines, NVSHMEM PEs as threads, the SIGSEGV reporter and the watchdog that ends a run
// with the drivers' common exit statuses:
//   0 everything matched; 1 a mismatch; 2 bad usage; 3 an emulated-device fault (printed by the
//   emulator; or a SIGSEGV outside device memory); 4 a kernel or runtime error; 5 the driver's
//   own deadline.
// Plain C++ against the emulator's CUDA runtime (csrc/emulator/include); every rank is a thread.
#pragma once

#include <cuda_runtime_api.h>
#include <nvshmem.h>
#include <nvshmemx.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "runtime/errors.hpp"
#include "runtime/nvshmem_runtime.hpp"

namespace emu_driver {

// ---- seeded random numbers (splitmix64: the same stream on every platform) ------------------------

struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  float uniform() { return float(next() >> 40) * (1.0f / 16777216.0f); }  // [0, 1)
  int below(int n) { return int(next() % uint64_t(n)); }
};

inline uint64_t mix(uint64_t a, uint64_t b) {
  return Rng(a * 0x100000001b3ull ^ (b + 0x9e3779b97f4a7c15ull)).next();
}

// ---- bf16, as the GPU (and csrc/emulator/include/cuda_bf16.h) rounds -------------------------------

inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
inline float from_bf16(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
// n bf16 values uniform in (-scale, scale).
inline std::vector<uint16_t> bf16_vector(Rng& rng, size_t n, float scale) {
  std::vector<uint16_t> v(n);
  for (auto& e : v) e = to_bf16((rng.uniform() * 2.0f - 1.0f) * scale);
  return v;
}

// ---- options ---------------------------------------------------------------------------------------

// The value of option argv[i] (advancing i); exits with status 2 when it is missing.
inline const char* option_value(int argc, char** argv, int& i) {
  if (i + 1 >= argc) {
    std::fprintf(stderr, "%s needs a value\n", argv[i]);
    std::exit(2);
  }
  return argv[++i];
}
inline std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) items.push_back(item);
  return items;
}

// Options every driver takes; a driver's Options derives from this and sets its own defaults.
struct CommonOptions {
  int ranks = 2;
  int tokens = 24;
  int hidden = 256;
  int topk = 4;
  uint64_t seed = 1;
  std::vector<std::string> cases;
  double timeout_s = 20.0;  // the kernels' own device timeout
  double deadline_s = 0.0;  // the driver's: 0 = 600 s
  bool sync_each = false;   // synchronise after every kernel (as the Python backend on the emulator)
  int max_reports = 8;      // mismatch lines per array
  bool verbose = false;
};

// A driver's command line: the common options, plus the driver's own declared by name. `--cases`
// takes a comma list; "all" stands for `all_cases`, and `extra_cases` may be named as well.
class OptionParser {
 public:
  OptionParser(CommonOptions& o, std::vector<std::string> all_cases, std::vector<std::string> extra_cases,
               void (*usage)(const char*))
      : o_(o), all_(std::move(all_cases)), valid_(all_), usage_(usage) {
    valid_.insert(valid_.end(), extra_cases.begin(), extra_cases.end());
    add("--ranks", o.ranks);
    add("--tokens", o.tokens);
    add("--hidden", o.hidden);
    add("--topk", o.topk);
    add("--max-reports", o.max_reports);
    add("--timeout-s", o.timeout_s);
    add("--deadline-s", o.deadline_s);
    values_["--seed"] = [&o](const char* v) { o.seed = std::strtoull(v, nullptr, 10); };
    flag("--sync-each", o.sync_each);
    flag("--verbose", o.verbose);
  }
  void add(const std::string& name, int& v) { values_[name] = [&v](const char* text) { v = std::atoi(text); }; }
  void add(const std::string& name, double& v) { values_[name] = [&v](const char* text) { v = std::atof(text); }; }
  void add(const std::string& name, std::function<void(const char*)> set) { values_[name] = std::move(set); }
  void flag(const std::string& name, bool& v) { flags_[name] = &v; }

  // False (after the usage text) on an unknown option or case; exits 0 on --help.
  bool parse(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "-h" || a == "--help") {
        usage_(argv[0]);
        std::exit(0);
      } else if (a == "--cases") {
        if (!set_cases(option_value(argc, argv, i))) return false;
      } else if (auto f = flags_.find(a); f != flags_.end()) {
        *f->second = true;
      } else if (auto v = values_.find(a); v != values_.end()) {
        v->second(option_value(argc, argv, i));
      } else {
        std::fprintf(stderr, "unknown option %s\n", a.c_str());
        usage_(argv[0]);
        return false;
      }
    }
    return true;
  }

  // The driver's verdict on the values: false (printed) when `bad` names a problem.
  bool accept(const char* bad) {
    if (bad == nullptr && o_.cases.empty()) bad = "nothing to run";
    if (bad != nullptr) {
      std::fprintf(stderr, "%s\n", bad);
      return false;
    }
    if (o_.deadline_s <= 0) o_.deadline_s = 600.0;
    return true;
  }

 private:
  bool set_cases(const std::string& list) {
    std::vector<std::string> cases;
    auto add_case = [&cases](const std::string& c) {
      if (std::find(cases.begin(), cases.end(), c) == cases.end()) cases.push_back(c);
    };
    for (const std::string& item : split_list(list)) {
      if (item == "all") {
        for (const std::string& c : all_) add_case(c);
      } else if (std::find(valid_.begin(), valid_.end(), item) != valid_.end()) {
        add_case(item);
      } else {
        std::string names;
        for (const std::string& c : valid_) names += c + ", ";
        std::fprintf(stderr, "unknown case '%s' (%sall)\n", item.c_str(), names.c_str());
        return false;
      }
    }
    o_.cases = cases;
    return true;
  }

  CommonOptions& o_;
  std::vector<std::string> all_, valid_;
  void (*usage_)(const char*);
  std::map<std::string, std::function<void(const char*)>> values_;
  std::map<std::string, bool*> flags_;
};

// Each block maps a stack and a guard page per thread (2 mappings each), and all blocks of all
// ranks' running kernels are alive at once in one process: warn when `fibers` (all of them at
// once, at most) may need more mappings than vm.max_map_count allows.
inline void warn_if_too_many_fibers(const char* driver, long fibers) {
  long max_maps = 0;
  if (FILE* f = std::fopen("/proc/sys/vm/max_map_count", "r")) {
    if (std::fscanf(f, "%ld", &max_maps) != 1) max_maps = 0;
    std::fclose(f);
  }
  if (max_maps > 0 && 2 * fibers > max_maps)
    std::fprintf(stderr,
                 "%s: warning: ~%ld fibers may need ~%ld memory mappings of fiber stacks at once, above "
                 "vm.max_map_count = %ld (the emulator then fails to start a block)\n",
                 driver, fibers, 2 * fibers, max_maps);
}

// ---- a host barrier for the setup and teardown steps (never between communication calls) -----------

class HostBarrier {
 public:
  explicit HostBarrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int gen = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int n_, arrived_ = 0, generation_ = 0;
};

// ---- device memory ---------------------------------------------------------------------------------
//
// Every array is its own cudaMalloc, so it ends at the emulator's guard page (an overrun faults;
// under ASan the slack to the guard page is poisoned too). Nothing is freed before the end of the
// rank's run (cudaFree waits for the rank's device).

struct DeviceArena {
  std::vector<void*> blocks;
  void* alloc(size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    EP_CUDA_CHECK(cudaMalloc(&p, bytes));
    blocks.push_back(p);
    return p;
  }
  template <typename T>
  T* alloc_n(size_t n) {
    return static_cast<T*>(alloc(n * sizeof(T)));
  }
  template <typename T>
  T* upload(const std::vector<T>& v) {
    T* p = static_cast<T*>(alloc(v.size() * sizeof(T)));
    if (p != nullptr) std::memcpy(p, v.data(), v.size() * sizeof(T));  // device memory is host memory
    return p;
  }
  ~DeviceArena() {
    for (void* p : blocks) (void)cudaFree(p);
  }
};

template <typename T>
std::vector<T> download(const void* p, size_t n) {
  std::vector<T> v(n);
  if (n != 0) std::memcpy(v.data(), p, n * sizeof(T));
  return v;
}

// ---- comparison and reports -------------------------------------------------------------------------

inline std::mutex g_print_mutex;
inline std::atomic<int> g_mismatches{0};

inline void log_line(bool verbose, const std::string& s) {
  if (!verbose) return;
  std::lock_guard<std::mutex> lock(g_print_mutex);
  std::fprintf(stderr, "%s\n", s.c_str());
}

// Bit-exact comparisons within one context (e.g. "rank 1 call 3 (bf16, seed 7)"); every difference
// up to max_reports per array prints "MISMATCH <context>: ...".
struct Checker {
  std::string context;
  int max_reports = 8;
  bool ok = true;

  template <typename T>
  static std::string text(T v) {
    if constexpr (std::is_floating_point_v<T>) {
      char buf[64];
      std::snprintf(buf, sizeof(buf), "%.9g", double(v));
      return buf;
    } else {
      return std::to_string(static_cast<long long>(v));
    }
  }

  // `got` and `want`, both [rows, cols] (cols 0: a flat list).
  template <typename T>
  void equal(const std::string& what, const std::vector<T>& got, const std::vector<T>& want, int cols) {
    if (got.size() != want.size()) {
      fail(what + ": got " + std::to_string(got.size()) + " elements, expected " + std::to_string(want.size()));
      return;
    }
    int reported = 0, bad = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      if (std::memcmp(&got[i], &want[i], sizeof(T)) == 0) continue;
      ++bad;
      if (reported++ < max_reports) {
        std::ostringstream os;
        os << what << "[" << (cols > 0 ? i / cols : i) << "][" << (cols > 0 ? i % cols : 0) << "] = " << text(got[i])
           << ", expected " << text(want[i]);
        fail(os.str());
      }
    }
    if (bad > max_reports) fail(what + ": " + std::to_string(bad) + " elements differ in all");
  }
  void fail(const std::string& message) {
    ok = false;
    g_mismatches.fetch_add(1);
    std::lock_guard<std::mutex> lock(g_print_mutex);
    std::fprintf(stderr, "MISMATCH %s: %s\n", context.c_str(), message.c_str());
  }
};

// ---- NVSHMEM PEs as threads ---------------------------------------------------------------------------
//
// nvshmem_runtime keeps one PE per process (its reference count and PE number are process-wide,
// as NVSHMEM's own state is), so only rank 0 initialises through nvshmem_runtime::acquire(); the
// other ranks initialise their PE (of their current emulated device: the emulated NVSHMEM finds
// PEs by device) with the same unique id through nvshmemi_init_thread, the call acquire() makes,
// all at once (the bootstrap waits for every PE). Call with the rank's device current; then a host
// barrier before anyone relies on rank 0's reference (runtimes take their own with add_reference).
inline void init_nvshmem_pe(const std::string& unique_id, int rank, int num_ranks) {
  if (rank == 0) {
    ep_comm::nvshmem_runtime::acquire(unique_id, 0, num_ranks, 0);
    return;
  }
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  EP_NVSHMEM_CHECK(nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &id, &attr));
  attr.args.cuda_device_id = rank;
  int provided = 0;
  const nvshmemi_version_t version = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                      NVSHMEM_VENDOR_PATCH_VERSION};
  EP_NVSHMEM_CHECK(
      nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, NVSHMEMX_INIT_WITH_UNIQUEID, &attr, version));
}

// After every runtime gave its reference back (a host barrier after their destroy()): rank 0's
// reference is the last (nvshmem_finalize), the other PEs finalise directly. Collective.
inline void finalize_nvshmem_pe(int rank) {
  if (rank == 0) ep_comm::nvshmem_runtime::release();
  else nvshmem_finalize();
}

// A symmetric heap just large enough for `buffer_bytes` (the default 1 GiB per PE costs ASan time
// to poison). Before the first NVSHMEM call; an explicit NVSHMEM_SYMMETRIC_SIZE wins.
inline void size_symmetric_heap(int64_t buffer_bytes) {
  const int64_t heap = (buffer_bytes + (4 << 20)) / (1 << 20) * (1 << 20);
  setenv("NVSHMEM_SYMMETRIC_SIZE", std::to_string(heap).c_str(), 0);
}

// ---- faults -----------------------------------------------------------------------------------------

#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
inline void on_segv(int sig, siginfo_t* info, void*) {
  char text[200];
  const int len = std::snprintf(text, sizeof(text),
                                "EMULATOR FAULT: signal %d at address %p (outside device memory: every allocation ends "
                                "at the emulator's guard page; or a host bug)\n",
                                sig, info->si_addr);
  if (len > 0) (void)!write(2, text, size_t(len));
  _exit(3);
}
// A SIGSEGV/SIGBUS prints the address and exits 3 (builds without a sanitizer; those report it).
inline void install_fault_reporter() {
  struct sigaction sa {};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, nullptr);
  sigaction(SIGBUS, &sa, nullptr);
}
#else
inline void install_fault_reporter() {}  // the sanitizer reports it, with a stack
#endif

// ---- the rank threads' outcome and the watchdog -----------------------------------------------------

struct RankOutcomes {
  explicit RankOutcomes(int num_ranks) : errors(num_ranks) {}
  std::mutex mutex;
  std::vector<std::string> errors;  // kernel/runtime errors per rank (the first one)
  std::atomic<int> finished{0};
  std::atomic<bool> any_error{false};

  void error(int rank, const std::string& text) {
    std::lock_guard<std::mutex> lock(mutex);
    if (errors[rank].empty()) errors[rank] = text;
    any_error = true;
  }
};

// Waits for the rank threads and returns the exit status (see the top of this file).
// An emulator fault is sticky for the process (a faulted CUDA context): report it and leave at
// once instead of letting the peers wait for their device timeouts. After a kernel error on one
// rank, give the others a moment to report theirs, then leave as well. `ok_text` is printed when
// everything matched.
inline int wait_for_ranks(RankOutcomes& out, std::vector<std::thread>& ranks, double deadline_s, uint64_t seed,
                          const std::string& ok_text) {
  const int num_ranks = static_cast<int>(ranks.size());
  const auto start = std::chrono::steady_clock::now();
  auto since = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  };
  auto fault = [] {
    std::lock_guard<std::mutex> lock(g_print_mutex);
    std::fprintf(stderr, "EMULATOR FAULT: %s\n", cudaGetErrorString(cudaErrorLaunchFailure));
    std::fflush(stderr);
  };
  std::chrono::steady_clock::time_point first_error{};
  bool saw_error = false;
  while (out.finished.load() < num_ranks) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (cudaPeekAtLastError() == cudaErrorLaunchFailure) {
      fault();
      _exit(3);
    }
    if (out.any_error && !saw_error) {
      saw_error = true;
      first_error = std::chrono::steady_clock::now();
    }
    if (saw_error && since(first_error) > 3.0) break;
    if (since(start) > deadline_s) {
      std::fprintf(stderr, "TIMEOUT: the driver's deadline of %.0f s passed (--deadline-s)\n", deadline_s);
      std::fflush(stderr);
      _exit(5);
    }
  }
  const bool all_finished = out.finished.load() == num_ranks;
  {
    std::lock_guard<std::mutex> lock(out.mutex);
    for (int r = 0; r < num_ranks; ++r)
      if (!out.errors[r].empty()) std::fprintf(stderr, "ERROR rank %d: %s\n", r, out.errors[r].c_str());
  }
  if (!all_finished) {
    std::fprintf(stderr, "ERROR: ranks still waiting after another rank's error; not waiting for their timeouts\n");
    std::fflush(stderr);
    _exit(g_mismatches.load() > 0 ? 1 : 4);
  }
  for (std::thread& t : ranks) t.join();
  if (cudaPeekAtLastError() == cudaErrorLaunchFailure) {
    fault();
    return 3;
  }
  if (g_mismatches.load() > 0) {
    std::fprintf(stderr, "FAILED: %d mismatch(es), seed %llu\n", g_mismatches.load(), (unsigned long long)seed);
    return 1;
  }
  if (out.any_error) return 4;
  std::fprintf(stderr, "%s\n", ok_text.c_str());
  return 0;
}

}  // namespace emu_driver
