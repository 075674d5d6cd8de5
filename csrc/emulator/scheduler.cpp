// The emulated device's execution engine: every block of a grid on its own OS thread, the threads
// of a block as fibers on it (see include/ep_emu/device.hpp for the model).
//
// A fiber runs until it reaches a barrier, a warp collective or a spin point; then the block's
// scheduler runs the next runnable fiber. Barriers and collectives check their participants and
// wake the waiters when complete. A block none of whose threads can move is a deadlock; a block
// whose threads only re-read unchanged values for longer than the hang limit is a hang. Both end
// the launch with an error that says, per thread, where it waits (the device's sticky error).
//
// Sanitizers: ASan is told about every stack switch. Under TSan (EP_EMU_TSAN; this file itself is
// built without TSan instrumentation, so the scheduler's own bookkeeping is invisible to it) each
// fiber is a TSan fiber, switched without synchronisation, and happens-before is added only where
// CUDA gives it: block barriers, named barriers and __syncwarp. Shuffles and ballots order nothing.
// Standalone fences, which TSan ignores, become the release/acquire of the relaxed atomics next
// to them ("fences under TSan" below).
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "emulator/engine.hpp"
#include "ep_emu/device.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define EP_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EP_EMU_ASAN 1
#endif
#endif

#ifdef EP_EMU_ASAN
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
}
#endif
#ifdef EP_EMU_TSAN
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif

// ---- the context switch (x86-64 System V): callee-saved registers, MXCSR and the x87 control word
#if !defined(__x86_64__)
#error "the ep_comm emulated device needs x86-64 (its fiber switch is written for it)"
#endif
extern "C" void ep_emu_switch(void** save_sp, void* new_sp);
extern "C" void ep_emu_fiber_start();
extern "C" void ep_emu_fiber_main();
asm(R"(
  .text
  .globl ep_emu_switch
  .hidden ep_emu_switch
  .type ep_emu_switch,@function
ep_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ep_emu_switch,.-ep_emu_switch
  .globl ep_emu_fiber_start
  .hidden ep_emu_fiber_start
  .type ep_emu_fiber_start,@function
ep_emu_fiber_start:
  call ep_emu_fiber_main@PLT
  ud2
  .size ep_emu_fiber_start,.-ep_emu_fiber_start
)");

namespace ep_comm {
namespace emu {
namespace {

enum class State { kRunnable, kBarrier, kWarp, kDone };
enum class Yield { kNone, kSpin, kIdle, kBlocked };

struct Site {
  const char* what = nullptr;
  const char* file = nullptr;
  int line = 0;
  const volatile void* address = nullptr;
};

// Values a fiber last read at a few spin sites: re-reading an unchanged value is not progress.
struct SpinMemo {
  const char* file = nullptr;
  int line = 0;
  const volatile void* address = nullptr;
  uint64_t value = 0;
};
constexpr int kSpinMemo = 4;

// Under EP_EMU_TSAN: a fiber's last fence, as the relaxed atomics around it use it ("fences under TSan").
enum class Fence { kNone, kPending, kUsed };
constexpr int kRelaxedReads = 4;

struct Fiber {
  void* sp = nullptr;
  char* stack_lo = nullptr;
  size_t stack_bytes = 0;
  int tid = 0;
  uint3 idx{};
  State state = State::kRunnable;
  Yield yield = Yield::kNone;
  bool progressed = false;  // since it was last scheduled
  Site wait;
  int barrier_id = -1;
  int warp_group = -1;  // its slot in WarpState::groups while it waits in a warp collective
  SpinMemo memo[kSpinMemo];
  int memo_next = 0;
  void* tsan_fiber = nullptr;
  void* asan_fake_stack = nullptr;
  bool started = false;
  Fence fence = Fence::kNone;
  int fence_barriers = 0;  // barriers and warp collectives passed while kPending
  const volatile void* relaxed_reads[kRelaxedReads] = {};  // since the last fence or barrier
  int num_relaxed_reads = 0;
};

struct BarrierState {
  int expected = 0;  // -1: every live thread (barrier 0 as __syncthreads)
  int arrived = 0;
  int count = 0;
  int generation = 0;
  int results[2] = {0, 0};
  char sync[2] = {0, 0};  // TSan sync objects, one per generation parity
  Site first;
  int first_tid = -1;
};

// One warp collective in flight among the lanes of `mask`. Lanes of a warp may wait in several at
// once when their masks differ: two halves of a warp, each in its own branch, or lanes 0-3 still in
// a collective of their own while lanes 4-7 already wait in the next one over lanes 0-7.
struct WarpGroup {
  unsigned arrived = 0;  // 0: the slot is free
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;     // kept when the slot is freed: the next collective over it prefers the slot
  int width = 32;
  int generation = 0;
  Site first;
  int first_lane = -1;
  char sync[2] = {0, 0};  // TSan sync objects, one per generation parity
};

struct WarpState {
  WarpGroup groups[32];  // a lane waits in at most one group, so 32 slots always suffice
  uint64_t values[32] = {};
  int args[32] = {};
  uint64_t results[32] = {};
};

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kReduceAdd: return "__reduce_add_sync";
    case WarpOp::kReduceMinSigned: case WarpOp::kReduceMinUnsigned: return "__reduce_min_sync";
    case WarpOp::kReduceMaxSigned: case WarpOp::kReduceMaxUnsigned: return "__reduce_max_sync";
    case WarpOp::kMatchAny: return "__match_any_sync";
  }
  return "?";
}

const char* base_name(const char* path) {
  if (path == nullptr) return "?";
  const char* slash = std::strrchr(path, '/');
  return slash != nullptr ? slash + 1 : path;
}

std::string where(const Site& s) {
  std::ostringstream os;
  os << (s.what ? s.what : "?") << " at " << base_name(s.file) << ":" << s.line;
  if (s.address != nullptr) os << " on address " << const_cast<const void*>(s.address);
  return os.str();
}

std::string dim_text(uint3 d) {
  std::ostringstream os;
  os << "(" << d.x << "," << d.y << "," << d.z << ")";
  return os.str();
}
std::string dim_text(dim3 d) { return dim_text(uint3{d.x, d.y, d.z}); }

long long monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

struct Block {
  LaunchState* launch = nullptr;
  uint3 idx{};
  int num_threads = 0;
  int num_live = 0;
  std::vector<Fiber> fibers;
  BarrierState barriers[16];
  std::vector<WarpState> warps;
  std::vector<int4> shared;  // dynamic shared memory, 16-byte aligned
  void* scheduler_sp = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_bytes = 0;
  void* tsan_scheduler = nullptr;
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
};

thread_local Block* t_block = nullptr;
thread_local Fiber* t_fiber = nullptr;

Block& this_block() {
  if (t_block == nullptr) {
    std::fprintf(stderr, "ep_comm emulated device: a kernel-language call outside a kernel\n");
    std::abort();
  }
  return *t_block;
}
Fiber& this_fiber() {
  if (t_fiber == nullptr) {
    std::fprintf(stderr, "ep_comm emulated device: a kernel-language call outside a kernel thread\n");
    std::abort();
  }
  return *t_fiber;
}

// ---- switching -----------------------------------------------------------------------------------

void run_fiber(Block& b, Fiber& f) {
  t_fiber = &f;
#ifdef EP_EMU_TSAN
  // The first switch synchronises (the fiber sees the launch's setup); later ones do not, so
  // threads of a block are as concurrent to TSan as they are on a GPU.
  __tsan_switch_to_fiber(f.tsan_fiber, f.started ? 1u : 0u);
#endif
  f.started = true;
#ifdef EP_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack_lo, f.stack_bytes);
#endif
  ep_emu_switch(&b.scheduler_sp, f.sp);
#ifdef EP_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  t_fiber = nullptr;
}

void to_scheduler(Fiber& f) {
  Block& b = *t_block;
#ifdef EP_EMU_TSAN
  __tsan_switch_to_fiber(b.tsan_scheduler, f.state == State::kDone ? 0u : 1u);
#endif
#ifdef EP_EMU_ASAN
  __sanitizer_start_switch_fiber(f.state == State::kDone ? nullptr : &f.asan_fake_stack, b.scheduler_stack_bottom,
                                 b.scheduler_stack_bytes);
#endif
  ep_emu_switch(&f.sp, b.scheduler_sp);
#ifdef EP_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake_stack, nullptr, nullptr);
#endif
}

// ---- faults ----------------------------------------------------------------------------------------

std::string thread_name(const Block& b, const Fiber& f) {
  std::ostringstream os;
  os << "thread " << dim_text(f.idx) << " (warp " << f.tid / 32 << " lane " << f.tid % 32 << ")";
  (void)b;
  return os.str();
}

std::string header(const Block& b) {
  std::ostringstream os;
  os << "kernel " << b.launch->name << ", block " << dim_text(b.idx) << " of grid " << dim_text(b.launch->grid)
     << " (" << b.num_threads << " threads)";
  return os.str();
}

// Where every thread of the block is, consecutive threads with the same story in one line.
std::string thread_report(const Block& b) {
  std::ostringstream os;
  auto describe = [&](const Fiber& f) -> std::string {
    std::ostringstream d;
    switch (f.state) {
      case State::kDone: d << "exited"; break;
      case State::kBarrier: {
        const BarrierState& bs = b.barriers[f.barrier_id];
        const int expected = bs.expected < 0 ? b.num_live : bs.expected;
        d << "waits in " << where(f.wait) << " (barrier " << f.barrier_id << ": " << bs.arrived << " of " << expected
          << " threads arrived)";
        break;
      }
      case State::kWarp: {
        const WarpGroup& g = b.warps[f.tid / 32].groups[f.warp_group];
        d << "waits in " << where(f.wait) << " (mask 0x" << std::hex << g.mask << ", lanes arrived 0x" << g.arrived
          << std::dec << ")";
        break;
      }
      case State::kRunnable:
        d << (f.wait.what ? "spins in " + where(f.wait) : std::string("runnable"));
        break;
    }
    return d.str();
  };
  int begin = 0;
  std::string current = b.fibers.empty() ? "" : describe(b.fibers[0]);
  for (int t = 1; t <= b.num_threads; ++t) {
    const std::string next = t < b.num_threads ? describe(b.fibers[t]) : std::string();
    if (t == b.num_threads || next != current) {
      if (begin == t - 1)
        os << "\n  thread " << begin;
      else
        os << "\n  threads " << begin << "-" << t - 1;
      os << ": " << current;
      begin = t;
      current = next;
    }
  }
  return os.str();
}

// Ends the launch with `message` (the first fault wins) and abandons the calling fiber.
[[noreturn]] void fault_here(const std::string& message) {
  Block& b = this_block();
  Fiber& f = this_fiber();
  b.launch->fail("ep_comm emulated device: " + message + " [" + header(b) + ", " + thread_name(b, f) + "]");
  f.state = State::kDone;
  f.yield = Yield::kBlocked;
  --b.num_live;
  to_scheduler(f);
  std::abort();  // never resumed
}

// ---- fences under TSan -----------------------------------------------------------------------------
//
// TSan has no notion of a standalone fence, but the kernels use two idioms built on one:
//   release  stores; a fence; a relaxed store or RMW at gpu/sys scope, which a peer acquires
//            (publish_p2p: rows, __threadfence_system, red_add on the peer's counter; send_acks);
//   acquire  a relaxed load or RMW; a fence; then what the word's writers published is read
//            (is_last_recv_block: atomicAdd on the blocks-done counter, then __threadfence).
// A fence marks its fiber kPending, and every relaxed store/RMW the fiber makes while marked first
// calls __tsan_release on its address (the mark becomes kUsed). The mark ends at the fiber's first
// barrier or warp collective after it was used (so a batch of relaxed writes all release), or at
// the second one if it was never used (publish_p2p's fence sits between two __syncwarp); a
// release store or RMW uses it up in the same way. A fence also calls __tsan_acquire on the
// addresses of the fiber's last few relaxed loads/RMWs since its previous fence or barrier.
// Approximations (they can hide a race, never invent one): a relaxed write also releases what the
// fiber wrote between the fence and it, and the fence acquires what the word's writers released
// up to then, not only what the value it read carried.

void fence_at_barrier(Fiber& f) {
  if (f.fence == Fence::kUsed || (f.fence == Fence::kPending && ++f.fence_barriers > 1)) f.fence = Fence::kNone;
  f.num_relaxed_reads = 0;
}

// ---- barriers ----------------------------------------------------------------------------------------

bool barrier_complete(const Block& b, const BarrierState& bs) {
  if (bs.arrived == 0) return false;
  const int expected = bs.expected < 0 ? b.num_live : bs.expected;
  return bs.arrived >= expected;
}

void release_barrier(Block& b, int id) {
  BarrierState& bs = b.barriers[id];
  bs.results[bs.generation & 1] = bs.count;
  ++bs.generation;
  bs.arrived = 0;
  bs.count = 0;
  bs.first_tid = -1;
  for (Fiber& f : b.fibers)
    if (f.state == State::kBarrier && f.barrier_id == id) {
      f.state = State::kRunnable;
      f.progressed = true;
    }
}

// The 32-bit reduction of the lanes of `mask` (values hold the 32-bit patterns).
uint64_t warp_reduce(WarpOp op, unsigned mask, const uint64_t* values) {
  bool first = true;
  uint32_t acc = 0;
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const uint32_t v = static_cast<uint32_t>(values[l]);
    const auto sv = static_cast<int32_t>(v), sacc = static_cast<int32_t>(acc);
    if (first) {
      acc = v;
      first = false;
    } else if (op == WarpOp::kReduceAdd) {
      acc += v;
    } else if (op == WarpOp::kReduceMinSigned) {
      acc = sv < sacc ? v : acc;
    } else if (op == WarpOp::kReduceMinUnsigned) {
      acc = v < acc ? v : acc;
    } else if (op == WarpOp::kReduceMaxSigned) {
      acc = sv > sacc ? v : acc;
    } else {
      acc = v > acc ? v : acc;
    }
  }
  return acc;
}

void release_warp(Block& b, int warp, WarpGroup& g) {
  WarpState& ws = b.warps[warp];
  const unsigned mask = g.mask;
  const int width = g.width;
  for (int lane = 0; lane < 32; ++lane) {
    if (!((mask >> lane) & 1u)) continue;
    const int segment = lane / width * width;
    int src = lane;
    bool own = false;
    switch (g.op) {
      case WarpOp::kSync: ws.results[lane] = 0; continue;
      case WarpOp::kReduceAdd:
      case WarpOp::kReduceMinSigned:
      case WarpOp::kReduceMinUnsigned:
      case WarpOp::kReduceMaxSigned:
      case WarpOp::kReduceMaxUnsigned:
        ws.results[lane] = warp_reduce(g.op, mask, ws.values);
        continue;
      case WarpOp::kBallot: {
        uint64_t ballot = 0;
        for (int l = 0; l < 32; ++l)
          if (((mask >> l) & 1u) && ws.values[l] != 0) ballot |= 1ull << l;
        ws.results[lane] = ballot;
        continue;
      }
      case WarpOp::kMatchAny: {
        uint64_t same = 0;
        for (int l = 0; l < 32; ++l)
          if (((mask >> l) & 1u) && ws.values[l] == ws.values[lane]) same |= 1ull << l;
        ws.results[lane] = same;
        continue;
      }
      case WarpOp::kShflIdx: src = segment + ((ws.args[lane] % width) + width) % width; break;
      case WarpOp::kShflUp: src = lane - ws.args[lane]; own = src < segment; break;
      case WarpOp::kShflDown: src = lane + ws.args[lane]; own = src >= segment + width; break;
      case WarpOp::kShflXor: src = lane ^ ws.args[lane]; own = src >= segment + width || src < 0 || src > 31; break;
    }
    ws.results[lane] = own ? ws.values[lane] : ws.values[src];
  }
  ++g.generation;
  g.arrived = 0;
  g.first_lane = -1;
  for (int lane = 0; lane < 32; ++lane) {
    const int tid = warp * 32 + lane;
    if (((mask >> lane) & 1u) && tid < b.num_threads && b.fibers[tid].state == State::kWarp) {
      b.fibers[tid].state = State::kRunnable;
      b.fibers[tid].progressed = true;
    }
  }
}

// A collective that can never complete: a lane that group `from` still needs waits in another
// group, which needs a lane that waits in ... `from`. Returns the group on that cycle whose missing
// lane waits in `from`, or -1. (Lanes that are elsewhere may still come: that is for the deadlock
// and hang checks.)
int warp_wait_cycle(const Block& b, int warp, int from) {
  const WarpState& ws = b.warps[warp];
  unsigned visited = 1u << from;
  int stack[32];
  int top = 0;
  stack[top++] = from;
  while (top > 0) {
    const int gi = stack[--top];
    const WarpGroup& g = ws.groups[gi];
    const unsigned missing = g.mask & ~g.arrived;
    for (int lane = 0; lane < 32; ++lane) {
      const int tid = warp * 32 + lane;
      if (!((missing >> lane) & 1u) || tid >= b.num_threads) continue;
      const Fiber& f = b.fibers[tid];
      if (f.state != State::kWarp) continue;
      if (f.warp_group == from) return gi;
      if (!((visited >> f.warp_group) & 1u)) {
        visited |= 1u << f.warp_group;
        stack[top++] = f.warp_group;
      }
    }
  }
  return -1;
}

// ---- the block's scheduler -------------------------------------------------------------------------------

enum class Order { kForward, kReverse, kRandom };

struct Schedule {
  Order order = Order::kForward;
  unsigned seed = 0;
};

Schedule schedule_from_env() {
  Schedule s;
  const char* spec = std::getenv("EP_COMM_EMU_SCHEDULE");
  if (spec == nullptr || *spec == '\0' || std::strcmp(spec, "forward") == 0) return s;
  if (std::strcmp(spec, "reverse") == 0) {
    s.order = Order::kReverse;
  } else if (std::strncmp(spec, "random", 6) == 0) {
    s.order = Order::kRandom;
    s.seed = spec[6] == ':' ? static_cast<unsigned>(std::strtoul(spec + 7, nullptr, 10)) : 12345u;
  }
  return s;
}

size_t stack_bytes_from_env() {
  const char* kb = std::getenv("EP_COMM_EMU_STACK_KB");
  size_t bytes = kb != nullptr ? static_cast<size_t>(std::strtoul(kb, nullptr, 10)) * 1024 : 0;
  if (bytes == 0) {
#ifdef EP_EMU_ASAN
    bytes = 256 * 1024;  // ASan's redzones make frames several times larger
#else
    bytes = 64 * 1024;
#endif
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return (bytes + page - 1) / page * page;
}

void report_stuck(Block& b, const char* kind) {
  std::ostringstream os;
  os << "ep_comm emulated device: " << kind << " in " << header(b) << thread_report(b);
  b.launch->fail(os.str());
}

void run_block(LaunchState* launch, uint3 idx) {
  Block b;
  b.launch = launch;
  b.idx = idx;
  const dim3 bd = launch->block;
  b.num_threads = static_cast<int>(bd.x * bd.y * bd.z);
  b.num_live = b.num_threads;
  b.fibers.resize(b.num_threads);
  b.warps.resize((b.num_threads + 31) / 32);
  b.shared.assign((launch->shared_bytes + 15) / 16 + 1, int4{0, 0, 0, 0});
  t_block = &b;

  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t stack_bytes = stack_bytes_from_env();
  b.stacks_bytes = stack_bytes * b.num_threads;
  void* stacks = mmap(nullptr, b.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) {
    launch->fail("ep_comm emulated device: cannot map fiber stacks for kernel " + launch->name);
    t_block = nullptr;
    return;
  }
  b.stacks = static_cast<char*>(stacks);
#ifdef EP_EMU_TSAN
  b.tsan_scheduler = __tsan_get_current_fiber();
#endif
  for (int t = 0; t < b.num_threads; ++t) {
    Fiber& f = b.fibers[t];
    f.tid = t;
    f.idx = uint3{static_cast<unsigned>(t) % bd.x, static_cast<unsigned>(t) / bd.x % bd.y,
                  static_cast<unsigned>(t) / (bd.x * bd.y)};
    f.stack_lo = b.stacks + stack_bytes * t;
    f.stack_bytes = stack_bytes;
    mprotect(f.stack_lo, page, PROT_NONE);  // a fiber that overflows its stack faults here
    // Initial frame for ep_emu_switch: control words, six callee-saved registers, then the entry.
    auto* top = reinterpret_cast<uint64_t*>(f.stack_lo + stack_bytes - 16 - 8);  // 16n + 8
    top[0] = reinterpret_cast<uint64_t>(&ep_emu_fiber_start);
    for (int r = 1; r <= 6; ++r) top[-r] = 0;
    top[-7] = 0x1F80ull | (0x037Full << 32);  // MXCSR default, x87 control word default
    f.sp = &top[-7];
#ifdef EP_EMU_TSAN
    f.tsan_fiber = __tsan_create_fiber(0);
#endif
  }

  const Schedule schedule = schedule_from_env();
  std::vector<int> order(b.num_threads);
  for (int t = 0; t < b.num_threads; ++t) order[t] = schedule.order == Order::kReverse ? b.num_threads - 1 - t : t;
  std::mt19937 rng(schedule.seed + 7919u * (idx.x + 131u * idx.y + 17161u * idx.z));
  if (schedule.order == Order::kRandom) std::shuffle(order.begin(), order.end(), rng);  // the first pass too
  const long long hang_ns = launch->hang_ns;
  long long last_progress = monotonic_ns();
  int idle_passes = 0;

  while (b.num_live > 0 && !launch->aborted()) {
    bool progress = false;
    int ran = 0;
    for (int t : order) {
      Fiber& f = b.fibers[t];
      if (f.state != State::kRunnable) continue;
      f.progressed = false;
      f.yield = Yield::kNone;
      run_fiber(b, f);
      ++ran;
      if (f.progressed || f.yield == Yield::kNone || f.yield == Yield::kBlocked) progress = true;
      if (launch->aborted()) break;
    }
    if (launch->aborted()) break;
    if (ran == 0) {
      const bool in_warp = std::any_of(b.fibers.begin(), b.fibers.end(),
                                       [](const Fiber& f) { return f.state == State::kWarp; });
      report_stuck(b, in_warp ? "deadlock (no thread of the block can move; lanes wait in warp collectives that "
                                "lanes of their mask never join: a divergent warp collective)"
                              : "deadlock (no thread of the block can move)");
      break;
    }
    if (schedule.order == Order::kRandom) std::shuffle(order.begin(), order.end(), rng);
    if (progress) {
      idle_passes = 0;
      last_progress = monotonic_ns();
      continue;
    }
    // Every runnable thread re-read an unchanged value: let other blocks and ranks run.
    ++idle_passes;
    if (idle_passes < 4) {
      std::this_thread::yield();
    } else {
      const long long sleep_us = std::min<long long>(1000, 20LL * (idle_passes - 3));
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
    }
    if (monotonic_ns() - last_progress > hang_ns) {
      report_stuck(b, "hang (every thread of the block re-read unchanged values for longer than the hang limit)");
      break;
    }
  }

#ifdef EP_EMU_TSAN
  for (Fiber& f : b.fibers) __tsan_destroy_fiber(f.tsan_fiber);
#endif
  munmap(b.stacks, b.stacks_bytes);
  t_block = nullptr;
}

}  // namespace

// ---- the kernel-language entry points -----------------------------------------------------------------------

uint3 thread_idx() { return this_fiber().idx; }
uint3 block_idx() { return this_block().idx; }
dim3 block_dim() { return this_block().launch->block; }
dim3 grid_dim() { return this_block().launch->grid; }
int lane_id() { return this_fiber().tid % 32; }
void* dynamic_shared_memory() { return this_block().shared.data(); }

void spin_point(const volatile void* address, size_t bytes, const char* what, const char* file, int line) {
  Fiber& f = this_fiber();
  uint64_t value = 0;
  if (address != nullptr) {
    if (bytes >= 8)
      value = __atomic_load_n(static_cast<const volatile uint64_t*>(address), __ATOMIC_RELAXED);
    else if (bytes == 4)
      value = __atomic_load_n(static_cast<const volatile uint32_t*>(address), __ATOMIC_RELAXED);
    else if (bytes == 2)
      value = __atomic_load_n(static_cast<const volatile uint16_t*>(address), __ATOMIC_RELAXED);
    else
      value = __atomic_load_n(static_cast<const volatile uint8_t*>(address), __ATOMIC_RELAXED);
  }
  bool seen = false;
  for (SpinMemo& m : f.memo)
    if (m.line == line && m.file == file && m.address == address) {
      seen = m.value == value;
      m.value = value;
      goto remembered;
    }
  f.memo[f.memo_next] = SpinMemo{file, line, address, value};
  f.memo_next = (f.memo_next + 1) % kSpinMemo;
remembered:
  if (!seen) f.progressed = true;
  f.wait = Site{what, file, line, address};
  f.yield = Yield::kSpin;
  to_scheduler(f);
}

long long global_timer_ns(const char* file, int line) {
  (void)file;
  (void)line;
  Fiber& f = this_fiber();
  f.yield = Yield::kIdle;
  to_scheduler(f);
  return monotonic_ns();
}

void nanosleep_ns(unsigned int ns, const char* file, int line) {
  (void)ns;
  Fiber& f = this_fiber();
  f.wait = Site{"__nanosleep", file, line, nullptr};
  f.yield = Yield::kIdle;
  to_scheduler(f);
}

int block_barrier(int id, int num_threads, int predicate, const char* what, const char* file, int line) {
  Block& b = this_block();
  Fiber& f = this_fiber();
  const Site site{what, file, line, nullptr};
  if (id < 0 || id > 15) fault_here("barrier id " + std::to_string(id) + " out of range 0..15 in " + where(site));
  if (num_threads >= 0 && (num_threads == 0 || num_threads % 32 != 0 || num_threads > b.num_threads)) {
    fault_here("named barrier " + std::to_string(id) + " with a thread count of " + std::to_string(num_threads) +
               " (must be a positive multiple of 32, at most the block's " + std::to_string(b.num_threads) + ") in " +
               where(site));
  }
  fence_at_barrier(f);
  BarrierState& bs = b.barriers[id];
  if (bs.arrived == 0) {
    bs.expected = num_threads;
    bs.first = site;
    bs.first_tid = f.tid;
  } else if (bs.expected != num_threads) {
    auto count = [](int n) { return n < 0 ? std::string("all threads") : std::to_string(n) + " threads"; };
    fault_here("barrier " + std::to_string(id) + " count mismatch: this thread waits for " + count(num_threads) +
               " in " + where(site) + ", thread " + std::to_string(bs.first_tid) + " waits for " + count(bs.expected) +
               " in " + where(bs.first));
  }
  ++bs.arrived;
  bs.count += predicate != 0 ? 1 : 0;
  const int generation = bs.generation;
#ifdef EP_EMU_TSAN
  __tsan_release(&bs.sync[generation & 1]);
#endif
  if (barrier_complete(b, bs)) {
    release_barrier(b, id);
    f.progressed = true;
  } else {
    f.state = State::kBarrier;
    f.barrier_id = id;
    f.wait = site;
    f.yield = Yield::kBlocked;
    to_scheduler(f);
  }
#ifdef EP_EMU_TSAN
  __tsan_acquire(&bs.sync[generation & 1]);
#endif
  return bs.results[generation & 1];
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
  Block& b = this_block();
  Fiber& f = this_fiber();
  const Site site{op_name(op), file, line, nullptr};
  const int warp = f.tid / 32, lane = f.tid % 32;
  const int lanes_in_warp = std::min(32, b.num_threads - warp * 32);
  const unsigned existing = lanes_in_warp == 32 ? 0xffffffffu : ((1u << lanes_in_warp) - 1u);
  auto hex = [](unsigned v) {
    std::ostringstream os;
    os << "0x" << std::hex << v;
    return os.str();
  };
  if (!((mask >> lane) & 1u))
    fault_here("lane " + std::to_string(lane) + " calls " + where(site) + " with mask " + hex(mask) +
               ", which does not include it");
  if ((mask & ~existing) != 0)
    fault_here(where(site) + " with mask " + hex(mask) + " names lanes that do not exist in this warp");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fault_here(where(site) + " with width " + std::to_string(width) + " (must be a power of two up to 32)");
  fence_at_barrier(f);
  WarpState& ws = b.warps[warp];
  auto divergent = [&](const WarpGroup& other) {
    fault_here("divergent warp collective: lane " + std::to_string(lane) + " calls " + where(site) + " with mask " +
               hex(mask) + " while lanes " + hex(other.arrived) + " wait in " + where(other.first) + " with mask " +
               hex(other.mask));
  };
  // The collective over this mask that is in flight, else a free slot (the one this mask used last,
  // so that TSan's sync objects of different masks stay apart).
  WarpGroup* g = nullptr;
  for (WarpGroup& c : ws.groups)
    if (c.arrived != 0 && c.mask == mask) g = &c;
  if (g != nullptr && (g->op != op || g->width != width)) divergent(*g);
  if (g == nullptr) {
    for (WarpGroup& c : ws.groups)
      if (c.arrived == 0 && (g == nullptr || c.mask == mask)) g = &c;
    g->op = op;
    g->mask = mask;
    g->width = width;
    g->first = site;
    g->first_lane = lane;
  }
  ws.values[lane] = value;
  ws.args[lane] = arg;
  g->arrived |= 1u << lane;
  [[maybe_unused]] const int generation = g->generation;
#ifdef EP_EMU_TSAN
  if (op == WarpOp::kSync) __tsan_release(&g->sync[generation & 1]);
#endif
  if (g->arrived == g->mask) {
    if (op == WarpOp::kShflIdx)
      for (int l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1u)) continue;
        const int src = l / width * width + ((ws.args[l] % width) + width) % width;
        if (!((mask >> src) & 1u))
          fault_here(where(site) + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
                     ", which is not in the mask " + hex(mask) + " (undefined on a GPU)");
      }
    release_warp(b, warp, *g);
    f.progressed = true;
  } else {
    f.state = State::kWarp;
    f.warp_group = static_cast<int>(g - ws.groups);
    f.wait = site;
    const int other = warp_wait_cycle(b, warp, f.warp_group);
    if (other >= 0) divergent(ws.groups[other]);
    f.yield = Yield::kBlocked;
    to_scheduler(f);
  }
#ifdef EP_EMU_TSAN
  if (op == WarpOp::kSync) __tsan_acquire(&g->sync[generation & 1]);
#endif
  return ws.results[lane];
}

int kernel_device() { return t_block != nullptr ? t_block->launch->device : -1; }

#ifdef EP_EMU_TSAN
void tsan_fence() {
  Fiber* f = t_fiber;
  if (f == nullptr) return;  // not in a kernel
  for (int i = 0; i < f->num_relaxed_reads; ++i) __tsan_acquire(const_cast<void*>(f->relaxed_reads[i]));
  f->num_relaxed_reads = 0;
  f->fence = Fence::kPending;
  f->fence_barriers = 0;
}

void tsan_before_store(const volatile void* address, int memory_order) {
  Fiber* f = t_fiber;
  if (f == nullptr || f->fence == Fence::kNone) return;
  if (memory_order == __ATOMIC_RELAXED) __tsan_release(const_cast<void*>(address));
  f->fence = Fence::kUsed;  // a release store releases by itself
}

void tsan_after_load(const volatile void* address, int memory_order) {
  Fiber* f = t_fiber;
  if (f == nullptr || memory_order != __ATOMIC_RELAXED) return;
  if (f->num_relaxed_reads < kRelaxedReads) {
    f->relaxed_reads[f->num_relaxed_reads++] = address;
  } else {
    for (int i = 1; i < kRelaxedReads; ++i) f->relaxed_reads[i - 1] = f->relaxed_reads[i];
    f->relaxed_reads[kRelaxedReads - 1] = address;
  }
}
#endif

[[noreturn]] void trap(const char* what, const char* file, int line) {
  fault_here(std::string(what) + " at " + base_name(file) + ":" + std::to_string(line));
}

void run_grid(LaunchState* launch) {
  const dim3 g = launch->grid;
  std::vector<std::thread> blocks;
  blocks.reserve(static_cast<size_t>(g.x) * g.y * g.z);
  try {
    for (unsigned z = 0; z < g.z; ++z)
      for (unsigned y = 0; y < g.y; ++y)
        for (unsigned x = 0; x < g.x; ++x) blocks.emplace_back(run_block, launch, uint3{x, y, z});
  } catch (const std::system_error& e) {
    // Thrown in the stream's worker, this would terminate the process. The blocks already started
    // see the abort and end.
    launch->fail("ep_comm emulated device: cannot start the thread of block " + std::to_string(blocks.size()) +
                 " of kernel " + launch->name + " (" + e.what() +
                 "): too many blocks alive in this process? (every block maps a stack and a guard page per thread: "
                 "vm.max_map_count)");
  }
  for (std::thread& t : blocks) t.join();
}

}  // namespace emu
}  // namespace ep_comm

int __syncthreads_and_impl(int predicate, const char* file, int line) {
  // True when no thread's predicate was zero: count the zeros.
  return ep_comm::emu::block_barrier(0, -1, predicate == 0, "__syncthreads_and", file, line) == 0;
}

extern "C" void ep_emu_fiber_main() {
  using namespace ep_comm::emu;
  Block& b = *t_block;
  Fiber& f = *t_fiber;
#ifdef EP_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack_bottom, &b.scheduler_stack_bytes);
#endif
  b.launch->body();
  f.state = State::kDone;
  f.yield = Yield::kBlocked;
  --b.num_live;
  // An exited thread no longer holds up __syncthreads of the others.
  if (barrier_complete(b, b.barriers[0]) && b.barriers[0].expected < 0) release_barrier(b, 0);
  to_scheduler(f);
  std::abort();  // a finished fiber is never resumed
}
